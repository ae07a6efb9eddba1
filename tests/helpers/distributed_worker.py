"""One rank of tests/test_distributed.py: greedy tokens of each model folder through mlx-lm's
loaders, what the rank holds, and the distribution after the prompt; rank 0 writes the JSON.

    mlx.launch -n 2 --backend ring --python "$(which python)" -- \\
        tests/helpers/distributed_worker.py --out two.json DIR:tensor DIR:pipeline

In one process (no launcher) every case loads whole, with `mlx_lm.utils.load`.
"""

import argparse
import json
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.utils import load, sharded_load


def load_case(path: str, mode: str, group):
    """The whole model in one process; under a launcher, this rank's part (mode: tensor or pipeline)."""
    if group.size() == 1:
        return load(path)[0]
    return sharded_load(path, **{f"{mode}_group": group})[0]


def local_heads(model) -> int:
    """Heads of the first local block (the paper's mLSTM keeps them in its cell)."""
    block = model.layers[0]
    layer = block.mlstm_layer if "mlstm_layer" in block else block.xlstm
    return layer.mlstm_cell.num_heads if "mlstm_cell" in layer else layer.num_heads


def run_cases(cases, prompt_tokens: int = 40, max_tokens: int = 8, seed: int = 0) -> list:
    """One row per "DIR:mode" case: tokens from mlx-lm's generate_step (greedy), the
    log-probabilities after the prompt, and the rank's blocks and heads."""
    group = mx.distributed.init()
    rows = []
    for case in cases:
        path, mode = case.rsplit(":", 1)
        model = load_case(path, mode, group)
        prompt = mx.random.randint(1, model.args.vocab_size, (prompt_tokens,), key=mx.random.key(seed))
        tokens, logprobs = [], []
        for token, lp in generate_step(prompt, model, max_tokens=max_tokens):
            tokens.append(int(token))
            logprobs.append(lp)
        rows.append({
            "model": path, "mode": mode if group.size() > 1 else "single", "ranks": group.size(),
            "tokens": tokens, "prompt_logprobs": logprobs[0].astype(mx.float32).tolist(),
            "local_blocks": len(model.layers), "local_heads": local_heads(model),
        })
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="+", help="DIR:tensor or DIR:pipeline")
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompt-tokens", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    rows = run_cases(args.cases, args.prompt_tokens, args.max_tokens)
    if mx.distributed.init().rank() == 0:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
