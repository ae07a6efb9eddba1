"""The benchmark's own counters (tools/bench.py): what its harness rows report must hold."""

import sys
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
    assert all(rows.values())
    assert set(bench_kernels.configurations(sides, "HEAD")) == {"HEAD", "tree"}  # no body differs
    sides["tree"]["gates"][0].kernel.body += "\n"
    assert set(bench_kernels.configurations(sides, "HEAD")) == {"HEAD", "tree", "tree, gates from HEAD"}


@pytest.mark.skipif(mx.cuda.is_available(), reason="on a CUDA GPU it measures (tools/gpu_run.sh hostcost)")
def test_the_host_cost_tool_says_it_needs_cuda():
    """tools/bench_host_cost.py measures MLX's CUDA backend: elsewhere it stops with a message."""
    import subprocess

    tool = Path(__file__).resolve().parent.parent / "tools" / "bench_host_cost.py"
    proc = subprocess.run([sys.executable, str(tool)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "run it on a CUDA GPU" in proc.stderr
