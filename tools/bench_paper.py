"""Decode and prefill speed of the paper's stack (mixed sLSTM + mLSTM blocks), random weights,
called as mlx-lm calls a model: the fast path (compiled decode step, compiled/kernel mLSTM
cell) against the plain pure-MLX path (MLX_XLSTM_KERNELS=0), with the greedy tokens of both.

    python tools/bench_paper.py                    # CPU, about a minute
    python tools/bench_paper.py --json out.json
"""

import argparse
import json
import os
import platform
import time

import mlx.core as mx

from mlx_lm_xlstm.paper import Model, ModelArgs


def paper_args(embedding_dim: int, num_blocks: int, vocab_size: int) -> ModelArgs:
    return ModelArgs.from_dict(
        {
            "model_type": "xlstm",
            "embedding_dim": embedding_dim,
            "num_blocks": num_blocks,
            "slstm_at": list(range(1, num_blocks, 2)),
            "vocab_size": vocab_size,
            "mlstm_block": {"mlstm": {"num_heads": 4}},
            "slstm_block": {"slstm": {"num_heads": 4}, "feedforward": {"proj_factor": 1.3}},
        }
    )


def measure(model, prompt: mx.array, steps: int, repeats: int):
    """Best of `repeats`: prefill tok/s of the prompt in one call, decode tok/s of greedy steps."""
    best_prefill = best_decode = 0.0
    for _ in range(repeats):
        cache = model.make_cache()
        tic = time.perf_counter()
        logits = model(prompt, cache=cache)
        mx.eval(logits, [c.state for c in cache])
        best_prefill = max(best_prefill, prompt.shape[1] / (time.perf_counter() - tic))
        token = mx.argmax(logits[:, -1], axis=-1)[:, None]
        tokens = []
        tic = time.perf_counter()
        for _ in range(steps):
            token = mx.argmax(model(token, cache=cache)[:, -1], axis=-1)[:, None]
            mx.eval(token)
            tokens.append(token.item())
        best_decode = max(best_decode, steps / (time.perf_counter() - tic))
    return best_prefill, best_decode, tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embedding-dim", type=int, default=256)
    parser.add_argument("--num-blocks", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=64, help="decode steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    a = parser.parse_args()

    mx.random.seed(0)
    model = Model(paper_args(a.embedding_dim, a.num_blocks, a.vocab_size))
    model.eval()  # as mlx-lm's load leaves it
    mx.eval(model.parameters())
    prompt = mx.random.randint(0, a.vocab_size, (1, a.prompt))
    rows = {}
    for name, env in (("fast path", "1"), ("plain (MLX_XLSTM_KERNELS=0)", "0")):
        os.environ["MLX_XLSTM_KERNELS"] = env
        prefill, decode, tokens = measure(model, prompt, a.steps, a.repeats)
        rows[name] = {"prefill_tok_s": round(prefill, 1), "decode_tok_s": round(decode, 1), "tokens": tokens}
        print(f"{name:30s} prefill {prefill:9.1f} tok/s   decode {decode:8.1f} tok/s")
    fast, plain = rows.values()
    result = {
        "machine": f"{platform.machine()} {platform.system()}, {mx.default_device()}, mlx {mx.__version__}",
        "shape": {"embedding_dim": a.embedding_dim, "num_blocks": a.num_blocks, "slstm_at": "odd blocks",
                  "vocab_size": a.vocab_size, "prompt": a.prompt, "steps": a.steps},
        "rows": rows,
        "decode_fast_vs_plain": round(fast["decode_tok_s"] / plain["decode_tok_s"], 2),
        "prefill_fast_vs_plain": round(fast["prefill_tok_s"] / plain["prefill_tok_s"], 2),
        "same_greedy_tokens": fast["tokens"] == plain["tokens"],
    }
    print(f"fast / plain: decode {result['decode_fast_vs_plain']}x, prefill {result['prefill_fast_vs_plain']}x; "
          f"same greedy tokens: {result['same_greedy_tokens']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
