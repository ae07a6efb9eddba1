"""What a fused kernel's call costs the host on CUDA, by the size of its binary (CUDA GPU).

    python tools/bench_host_cost.py --json host_cost.json

MLX names the module of a `mx.fast.precompiled_cuda_kernel` by a hash of the binary, computed
at every evaluation (mlx/backend/cuda/custom_kernel.cpp), so each call costs host time in
proportion to the binary's bytes, compiled decode step or not; and a decode step is paced
by the host. Three rows: one kernel's binary (the gates kernel's) called with trailing
padding of 0, 100 and 400 KB, against an MLX op; the binaries the 7B's decode step calls
(bytes a layer); decode through a random 7B with every kernel binary padded by 40 KB
against unpadded, processes alternating after one whose rows are dropped (it builds the
caches: on a fresh machine the first process measured 136 tok/s where later ones gave
195; `--pad` runs one such process).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from mlx_lm_xlstm.kernels import gated_norm, gates, step  # noqa: E402

CALLS = 1500


def per_call_us(run) -> float:
    run()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / CALLS * 1e6


def call_rows() -> dict:
    """Host microseconds a call: CALLS independent launches of one tiny kernel in one evaluation."""
    x, w, b = mx.ones((1, 64), mx.bfloat16), mx.ones((16, 64), mx.float32), mx.zeros((16,), mx.float32)
    cap = mx.array([15.0])
    gates.launch(gates.kernel, x, w, b, 15.0)  # compiles it
    symbol, binary = next(iter(gates.kernel._binaries.values()))
    rows = {"MLX op (x + 1)": per_call_us(lambda: mx.eval([x + 1 for _ in range(CALLS)]))}
    for pad in (0, 100_000, 400_000):
        padded = binary + b"\0" * pad

        def run(padded=padded):
            mx.eval([
                mx.fast.precompiled_cuda_kernel(
                    name=symbol, compiled_source=padded, inputs=[x, w, b, cap], output_shapes=[(1, 8)] * 2,
                    output_dtypes=[mx.float32] * 2, scalars=[64], grid=(512, 1, 1), threadgroup=(512, 1, 1),
                    ensure_row_contiguous=True,
                )[0]
                for _ in range(CALLS)
            ])

        rows[f"precompiled kernel, binary {len(padded)} B"] = per_call_us(run)
    return rows


def binary_bytes() -> dict:
    """Bytes of each binary a 7B decode step calls once a layer (bf16, batch 1)."""
    import mlx_lm_xlstm.kernels as kernels

    q, k, v, i, log_f, C, n, m = kernels._random_step_inputs(B=1, T=1, H=8, Dqk=256, Dv=512, dtype=mx.bfloat16)
    qkvo = mx.zeros((1, 3 * 8 * 512), mx.bfloat16)
    step.launch(step.kernel, q, k, v, i, log_f, C, n, m, 1e-6)
    gates.launch(gates.kernel, mx.zeros((1, 4096), mx.bfloat16), mx.zeros((16, 4096)), mx.zeros((16,)), 15.0)
    gated_norm.launch(gated_norm.kernel, mx.zeros((1, 1, 8, 512)), qkvo, mx.ones((4096,), mx.bfloat16), None, 8192, 1e-6)
    sizes = {name: max(len(b) for _, b in module.kernel._binaries.values()) for name, module in
             (("step", step), ("gates", gates), ("gated_norm", gated_norm))}
    return {**sizes, "a layer": sum(sizes.values())}


def decode_tok_s(pad: int) -> dict:
    """Decode through a random 7B, every kernel binary padded by `pad` bytes (this process)."""
    import bench

    from mlx_lm_xlstm.kernels import cuda as cuda_module

    real = cuda_module.compiled
    cuda_module.compiled = lambda source, name: real(source, name) + b"\0" * pad
    model = bench.build_model("7b", mx.bfloat16)
    rows = {}
    for B, n in ((1, 48), (16, 16)):
        logits, cache = bench.prefill(model, bench.tokens(B, 8, model.args.vocab_size, seed=B))
        y = mx.argmax(logits[:, -1], axis=-1)[:, None]
        rates = []
        for _ in range(6):
            y, seconds = bench.pipelined_greedy(model, cache, y, n)
            rates.append(B * n / seconds)
        rows[f"decode B={B} tok/s"] = statistics.median(rates[1:])
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--pad", type=int, help=argparse.SUPPRESS)  # one decode process
    args = parser.parse_args()
    if not mx.cuda.is_available():
        sys.exit("bench_host_cost.py measures MLX's CUDA backend: run it on a CUDA GPU")
    if args.pad is not None:
        print(json.dumps(decode_tok_s(args.pad)))
        return
    out = {"host us a call": call_rows(), "binary bytes a 7B layer calls": binary_bytes()}
    print(json.dumps(out, indent=1), flush=True)
    def decode(pad):  # a process of its own: the binaries are padded as they are compiled
        proc = subprocess.run([sys.executable, __file__, "--pad", str(pad)], capture_output=True, text=True, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    decode(0)
    for rnd in range(2):
        for pad in (0, 40_000):
            row = decode(pad)
            out.setdefault(f"binaries padded by {pad} B", []).append(row)
            print(f"padded by {pad} B: {row}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
