"""The benchmark's own counters (tools/bench.py): what its harness rows report must hold."""

import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import bench  # noqa: E402


def test_launches_count_kernels_not_views():
    x = mx.random.normal((4, 8))
    assert bench.launches([mx.exp(x) + 1]) > 2  # x's own graph is part of it until evaluated
    mx.eval(x)
    assert bench.launches([mx.exp(x) + 1]) == 2
    assert bench.launches([(x.T + 1).reshape(32)]) == 1
    fused = mx.compile(lambda x: mx.exp(x) * 2 + 1)
    assert bench.launches([fused(x)]) == 1


def test_launches_per_layer_of_the_decode_step_are_fewer_than_of_a_prompt_step():
    model = bench.build_model("tiny", mx.float32)
    decode, prompt = bench.launches_per_layer(model, 1), bench.launches_per_layer(model, 64)
    assert 5 < decode < prompt
    counts = bench.ops_per_layer(model, 1)
    assert counts["launches"] == decode < counts["ops"]  # views are ops the host encodes too


def test_the_decode_host_split_is_part_of_the_step():
    model = bench.build_model("tiny", mx.float32)
    split = bench.decode_host_ms(model, 2, steps=8)
    assert 0 < split["build_ms"] and 0 < split["encode_ms"]
    assert split["build_ms"] + split["encode_ms"] <= 1.05 * split["step_ms"]


def test_the_kernel_ab_compares_the_bodies_at_a_commit_with_the_tree():
    """tools/bench_kernels.py's sides, run on the CPU (the CUDA units emulated): HEAD's bodies
    against the tree's give the same outputs, kernel by kernel; a kernel whose body differs
    gets a configuration of its own."""
    import bench_kernels
    from helpers.cuda_emulator import EmulatedKernel

    sides = bench_kernels.sides_for("HEAD", make=lambda module, tag: EmulatedKernel(bench_kernels.cuda_kernel(module, tag)))
    assert set(sides) == {"HEAD", "tree"}
    rows = bench_kernels.same_outputs(sides, small=True)
    assert set(rows) == {f"{name} B={B}" for name in bench_kernels.MODULES for B in (1, 16)}
    assert all(row["same"] and row["max_abs_diff"] == 0 for row in rows.values())
    assert set(bench_kernels.configurations(sides, "HEAD")) == {"HEAD", "tree"}  # no body differs
    kernel, launch = sides["tree"]["gates"]
    sides["tree"]["gates"] = (kernel, lambda *args: [y + 0.5 for y in launch(*args)])  # a body off by 0.5
    off = bench_kernels.same_outputs(sides, small=True)
    assert off["gates B=1"] == {"same": False, "max_abs_diff": 0.5} and off["step B=1"]["same"]
    sides["tree"]["gates"] = (kernel, launch)
    sides["tree"]["gates"][0].kernel.body += "\n"
    assert set(bench_kernels.configurations(sides, "HEAD")) == {"HEAD", "tree", "tree, gates from HEAD"}


@pytest.mark.skipif(mx.cuda.is_available(), reason="on a CUDA GPU it measures (tools/gpu_run.sh hostcost)")
def test_the_host_cost_tool_says_it_needs_cuda():
    """tools/bench_host_cost.py measures MLX's CUDA backend: elsewhere it stops with a message."""
    import subprocess

    tool = Path(__file__).resolve().parent.parent / "tools" / "bench_host_cost.py"
    proc = subprocess.run([sys.executable, str(tool)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "run it on a CUDA GPU" in proc.stderr


@pytest.mark.skipif(mx.cuda.is_available(), reason="on a CUDA GPU it measures (tools/gpu_run.sh hostprofile)")
def test_the_host_profile_tool_says_it_needs_cuda():
    import subprocess

    tool = Path(__file__).resolve().parent.parent / "tools" / "bench_host_profile.py"
    proc = subprocess.run([sys.executable, str(tool)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "run it on a CUDA GPU" in proc.stderr


def test_the_nvtx_library_times_nested_ranges(tmp_path):
    """tools/nvtx_stats.cpp as NVTX drives it: the injection entry point takes the range
    callbacks' slots from the export table it is handed, and push / pop then count each range
    by name, a parent's exclusive time without its children's."""
    import ctypes
    import csv

    import bench_host_profile

    stats = ctypes.CDLL(str(bench_host_profile.build_library(tmp_path)))
    slots = (ctypes.c_void_p * 16)()  # a module's callback slots, and the table of their addresses
    slot_pointers = (ctypes.c_void_p * 16)(*(ctypes.addressof(slots) + j * ctypes.sizeof(ctypes.c_void_p) for j in range(16)))

    TABLE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_uint))

    @TABLE
    def module_table(module, out_table, out_size):
        if module != 5:  # NVTX_CB_MODULE_CORE2
            return 0
        out_table[0] = ctypes.addressof(slot_pointers)
        out_size[0] = 16
        return 1

    class Callbacks(ctypes.Structure):
        _fields_ = [("struct_size", ctypes.c_size_t), ("GetModuleFunctionTable", TABLE)]

    callbacks = Callbacks(ctypes.sizeof(Callbacks), module_table)

    @ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)
    def export_table(table_id):
        return ctypes.addressof(callbacks) if table_id == 1 else None  # NVTX_ETID_CALLBACKS

    assert stats.InitializeInjectionNvtx2(export_table) == 1
    assert slots[4] and slots[5]  # DomainRangePushEx, DomainRangePop

    class Attributes(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint16), ("size", ctypes.c_uint16), ("category", ctypes.c_uint32),
                    ("colorType", ctypes.c_int32), ("color", ctypes.c_uint32), ("payloadType", ctypes.c_int32),
                    ("reserved0", ctypes.c_int32), ("payload", ctypes.c_uint64), ("messageType", ctypes.c_int32),
                    ("message", ctypes.c_char_p)]

    push = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(Attributes))(slots[4])
    pop = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)(slots[5])
    outer, inner = (Attributes(3, ctypes.sizeof(Attributes), messageType=1, message=name) for name in (b"gpu::eval", b"Matmul::eval_gpu"))
    for _ in range(3):
        push(None, ctypes.byref(outer))
        push(None, ctypes.byref(inner))
        time.sleep(0.002)
        pop(None)
        time.sleep(0.002)
        pop(None)
    dump = tmp_path / "stats.tsv"
    assert stats.nvtx_stats_dump(str(dump).encode()) == 1
    rows = {r["name"]: r for r in csv.DictReader(open(dump), delimiter="\t")}
    assert {name: int(r["count"]) for name, r in rows.items()} == {"gpu::eval": 3, "Matmul::eval_gpu": 3}
    outer_row, inner_row = rows["gpu::eval"], rows["Matmul::eval_gpu"]
    assert float(inner_row["incl_us"]) == float(inner_row["excl_us"]) >= 3 * 2000
    assert float(outer_row["excl_us"]) == pytest.approx(float(outer_row["incl_us"]) - float(inner_row["incl_us"]), abs=1.0)
    assert float(outer_row["excl_us"]) >= 3 * 2000
    stats.nvtx_stats_reset()
    assert stats.nvtx_stats_dump(str(dump).encode()) == 1
    assert dump.read_text().splitlines() == ["name\tcount\tincl_us\texcl_us"]
