"""Tensor/pipeline-parallel xLSTM through mlx-lm's loaders: greedy tokens against one
process, and prefill/decode speed for 1 vs N ranks, on random weights of a given shape.

All at once (7B shape, bf16, two GPUs of one host over NCCL):

    python tools/bench_distributed.py all --dir /tmp/xlstm-7b --shape 7b --backend nccl -n 2

Step by step (the same on CPU with the ring backend, at the tiny shape):

    python tools/bench_distributed.py make /tmp/xlstm-7b --shape 7b --dtype bfloat16
    python tools/bench_distributed.py run --case /tmp/xlstm-7b:tensor --out one.json
    mlx.launch --backend nccl -n 2 --python "$(which python)" -- \\
        tools/bench_distributed.py run --case /tmp/xlstm-7b:tensor --out two.json
    python tools/bench_distributed.py compare one.json two.json

`run` loads each case with `mlx_lm.utils.sharded_load` (tensor or pipeline group) when
launched on several ranks, with `mlx_lm.utils.load` in one process, then times `mlx_lm.generate.generate_step` (greedy).
Rank 0 writes the JSON.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_models import SHAPES, write_xlstm  # noqa: E402


def make_model(path, shape: str, dtype="bfloat16", q_bits=None, q_group_size=None):
    """A loadable random-weight folder (tools/random_models.py: the real config.json for 7b,
    transformers' tensor names, mlx-lm's quantize_model for q_bits)."""
    return write_xlstm(path, shape, dtype, q_bits=q_bits, q_group_size=q_group_size)


def load_case(path: str, mode: str, group):
    from mlx_lm.utils import load, sharded_load

    if group.size() == 1:
        return load(path)[0]
    if mode == "tensor":
        return sharded_load(path, tensor_group=group)[0]
    if mode == "pipeline":
        return sharded_load(path, pipeline_group=group)[0]
    raise ValueError(f"unknown mode '{mode}' (expected 'tensor' or 'pipeline')")


def local_heads(model):
    """Heads of the first local block (the paper's mLSTM keeps them in its cell)."""
    block = model.layers[0]
    layer = block.mlstm_layer if "mlstm_layer" in block else block.xlstm
    return layer.mlstm_cell.num_heads if "mlstm_cell" in layer else layer.num_heads


def greedy(model, prompt: mx.array, max_tokens: int):
    """Tokens from mlx-lm's own generation loop, prefill and decode times, and the gap
    between the two best log-probabilities at each step (how close greedy was to a tie)."""
    from mlx_lm.generate import generate_step

    tokens, logprobs = [], []
    start = time.perf_counter()
    for token, lp in generate_step(prompt, model, max_tokens=max_tokens):
        if not tokens:
            first = time.perf_counter()
        tokens.append(int(token))
        logprobs.append(lp)
    end = time.perf_counter()
    logprobs = mx.stack(logprobs).astype(mx.float32)
    top2 = mx.topk(logprobs, 2, axis=-1)
    margins = mx.abs(top2[:, 1] - top2[:, 0]).tolist()
    return tokens, margins, logprobs[0].tolist(), first - start, end - first


def run_cases(cases, prompt_tokens: int, max_tokens: int, warmup: int = 1, seed: int = 0):
    group = mx.distributed.init()
    results = []
    for case in cases:
        path, mode = case.rsplit(":", 1)
        model = load_case(path, mode, group)
        vocab = model.args.vocab_size
        prompt = mx.random.randint(1, vocab, (prompt_tokens,), key=mx.random.key(seed))
        for _ in range(warmup):
            greedy(model, prompt[: 2 * model.args.chunk_size], 4)
        mx.reset_peak_memory()
        tokens, margins, prompt_logprobs, prefill_s, decode_s = greedy(model, prompt, max_tokens)
        results.append({
            "model": path, "mode": mode if group.size() > 1 else "single", "ranks": group.size(),
            "tokens": tokens, "top2_margins": [round(m, 4) for m in margins],
            # The distribution after the prompt, to tell rounding from a real difference.
            "prompt_logprobs": [round(x, 5) for x in prompt_logprobs],
            # What this rank holds: blocks (pipeline) and heads per mLSTM layer (tensor).
            "local_blocks": len(model.layers), "local_heads": local_heads(model),
            "prefill_tok_s": prompt_tokens / prefill_s,
            "decode_tok_s": (len(tokens) - 1) / decode_s if len(tokens) > 1 else None,
            "peak_memory_gb_rank0": mx.get_peak_memory() / 1e9,
        })
        del model
    return {"device": str(mx.default_device()), "ranks": group.size(), "cases": results}


def compare(reference: dict, other: dict) -> bool:
    """Print a table and return whether every case gives the reference's tokens."""
    ok = True
    print(f"{'model':<28} {'mode':<9} {'ranks':>5} {'prefill tok/s':>14} {'decode tok/s':>13}  tokens")
    for ref, case in zip(reference["cases"], other["cases"]):
        for r in (ref, case):
            decode = f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "-"
            name = Path(r["model"]).name
            print(f"{name:<28} {r['mode']:<9} {r['ranks']:>5} {r['prefill_tok_s']:>14.1f} {decode:>13}", end="")
            if r is ref:
                print()
        same = ref["tokens"] == case["tokens"]
        drift = max(abs(x - y) for x, y in zip(ref["prompt_logprobs"], case["prompt_logprobs"]))
        if not same:
            i = next(i for i, (x, y) in enumerate(zip(ref["tokens"], case["tokens"])) if x != y)
            margin = ref["top2_margins"][i]
            print(f"  DIFFER from token {i} (one process's top-2 log-prob gap there: {margin})", end="")
        else:
            print("  identical", end="")
        print(f"; max |log-prob difference| after the prompt: {drift:.2g}")
        ok &= same
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make", help="write a random-weight checkpoint folder")
    p.add_argument("dir")
    p.add_argument("--shape", choices=SHAPES, default="tiny")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--q-bits", type=int)
    p.add_argument("--q-group-size", type=int, default=32)

    p = sub.add_parser("run", help="greedy generation on this rank (under mlx.launch: sharded)")
    p.add_argument("--case", action="append", required=True, help="DIR:tensor or DIR:pipeline")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", required=True)

    p = sub.add_parser("compare", help="tokens identical? speed table")
    p.add_argument("reference")
    p.add_argument("other")

    p = sub.add_parser("all", help="make (if missing), run on 1 and on N ranks, compare")
    p.add_argument("--dir", required=True)
    p.add_argument("--shape", choices=SHAPES, default="7b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--mode", choices=("tensor", "pipeline"), default="tensor")
    p.add_argument("--backend", default="nccl")
    p.add_argument("-n", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--timeout", type=int, default=1200)
    args = parser.parse_args()

    if args.command == "make":
        make_model(args.dir, args.shape, args.dtype, args.q_bits, args.q_group_size)
    elif args.command == "run":
        result = run_cases(args.case, args.prompt_tokens, args.max_tokens, args.warmup)
        if mx.distributed.init().rank() == 0:
            Path(args.out).write_text(json.dumps(result, indent=1))
    elif args.command == "compare":
        load_json = lambda p: json.loads(Path(p).read_text())
        sys.exit(0 if compare(load_json(args.reference), load_json(args.other)) else 1)
    else:
        run_all(args)


def run_all(args):
    folder = Path(args.dir)
    if not (folder / "config.json").exists():
        make_model(folder, args.shape, args.dtype)
    tool = str(Path(__file__).resolve())
    common = [
        "run", "--case", f"{folder}:{args.mode}", "--prompt-tokens", str(args.prompt_tokens),
        "--max-tokens", str(args.max_tokens),
    ]
    one, many = folder / "bench_1.json", folder / f"bench_{args.n}.json"
    subprocess.run([sys.executable, tool, *common, "--out", str(one)], check=True, timeout=args.timeout)
    launch = [
        str(Path(sys.executable).parent / "mlx.launch"), "--backend", args.backend, "-n", str(args.n),
        "--python", sys.executable, "--",
    ]
    subprocess.run([*launch, tool, *common, "--out", str(many)], check=True, timeout=args.timeout)
    load_json = lambda p: json.loads(Path(p).read_text())
    sys.exit(0 if compare(load_json(one), load_json(many)) else 1)


if __name__ == "__main__":
    main()
