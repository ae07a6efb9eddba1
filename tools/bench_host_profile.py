"""Where the host's time goes, op kind by op kind, on MLX's CUDA backend (CUDA GPU, g++).

    python tools/bench_host_profile.py --json host_profile.json [--layers 32]

A decode step is paced by the host about as much as by the GPU: MLX encodes every op of
every step (the peer replays one CUDA graph). MLX's CUDA backend marks its work with NVTX
ranges: gpu::eval around each array it encodes, <Primitive>::eval_gpu inside (Matmul,
CustomKernel for the fused kernels, Compiled, RMSNorm, ...) and CommandEncoder::commit for
each CUDA graph it launches. tools/nvtx_stats.cpp, built here with g++ and injected through
NVTX_INJECTION64_PATH, times them; this tool runs a random 7B (xLSTM-7b's config, bf16) as
mlx-lm's loop does (each step queued before the previous one is awaited) and reports, per
decode step at batch 1 and 16 and per 2048-token prompt call: calls, microseconds a call and
a step for every range, beside the step's build / encode / wait split.
"""

import argparse
import ctypes
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def build_library(folder: Path) -> Path:
    """tools/nvtx_stats.cpp as a shared library in `folder`."""
    library = Path(folder) / "libnvtx_stats.so"
    subprocess.run(
        ["g++", "-O2", "-shared", "-fPIC", "-std=c++17", "-fvisibility=hidden", "-o", str(library), str(ROOT / "tools" / "nvtx_stats.cpp")],
        check=True,
    )
    return library


def read_stats(path: Path, per: int) -> dict:
    """The dump of `nvtx_stats_dump`, per step (`per` steps), largest exclusive time first."""
    rows = {}
    for r in csv.DictReader(open(path), delimiter="\t"):
        count, exclusive = int(r["count"]), float(r["excl_us"])
        rows[r["name"]] = {"calls": round(count / per, 2), "us_a_call": round(exclusive / count, 2), "us": round(exclusive / per, 1)}
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]["us"]))


def profile(stats, layers: int, out: Path) -> dict:
    import mlx.core as mx

    import bench

    config = bench.xlstm_config("7b")
    config["num_blocks"] = layers
    model = bench.random_xlstm(config, mx.bfloat16)
    mx.eval(model.parameters())
    result = {"layers": layers}

    def measured(tag, per, run):
        mx.synchronize()
        stats.nvtx_stats_reset()
        row = run()
        stats.nvtx_stats_dump(str(out / f"{tag}.tsv").encode())
        result[tag] = {**row, "ranges (exclusive us)": read_stats(out / f"{tag}.tsv", per)}
        print(tag, row, flush=True)

    for B, steps in ((1, 64), (16, 32)):
        logits, cache = bench.prefill(model, bench.tokens(B, 8, model.args.vocab_size, seed=B))
        y = mx.argmax(logits[:, -1], axis=-1)[:, None]
        bench.pipelined_greedy(model, cache, y, 8)  # traced

        def decode():
            nonlocal y
            build = encode = wait = 0.0
            start, previous = time.perf_counter(), None
            for _ in range(steps):
                t0 = time.perf_counter()
                logits = model(y, cache=cache)
                t1 = time.perf_counter()
                y = mx.argmax(logits[:, -1], axis=-1)[:, None]
                mx.async_eval(y)
                t2 = time.perf_counter()
                if previous is not None:
                    mx.eval(previous)
                build, encode, wait = build + t1 - t0, encode + t2 - t1, wait + time.perf_counter() - t2
                previous = y
            mx.eval(y)
            ms = lambda s: round(1e3 * s / steps, 3)
            total = time.perf_counter() - start
            return dict(build_ms=ms(build), encode_ms=ms(encode), wait_ms=ms(wait), step_ms=ms(total), tok_s=round(B * steps / total, 1))

        measured(f"decode B={B}, a step", steps, decode)

    prompt = bench.tokens(1, 2048, model.args.vocab_size)
    bench.prefill(model, prompt)

    def prompt_calls():
        start = time.perf_counter()
        for _ in range(3):
            bench.prefill(model, prompt)
        return dict(prefill_2048_s=round((time.perf_counter() - start) / 3, 4))

    measured("prefill of 2048 tokens, a call", 3, prompt_calls)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--layers", type=int, default=32, help="blocks of the 7B shape (default all 32)")
    args = parser.parse_args()
    import mlx.core as mx

    if not mx.cuda.is_available():
        sys.exit("bench_host_profile.py profiles MLX's CUDA backend: run it on a CUDA GPU")
    with tempfile.TemporaryDirectory(prefix="host-profile-") as folder:  # the library and its dumps
        library = build_library(Path(folder))
        os.environ["NVTX_INJECTION64_PATH"] = str(library)  # read at MLX's first NVTX range, below
        stats = ctypes.CDLL(str(library))
        result = profile(stats, args.layers, Path(folder))
    if not any(result[k]["ranges (exclusive us)"] for k in result if k != "layers"):
        sys.exit("no NVTX range was recorded: this MLX build marks none, or NVTX did not load the library")
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
