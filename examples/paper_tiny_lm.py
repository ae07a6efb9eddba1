"""Train a tiny xLSTM[1:1] language model (one mLSTM and one sLSTM block, the paper's
architecture) from scratch on bytes of a Python standard-library source file, then
sample from it with mlx-lm's generation loop (recurrent caches, step decode).

    python examples/paper_tiny_lm.py --steps 300 --save tiny_xlstm
    python -c "from mlx_lm.utils import load_model; print(load_model(__import__('pathlib').Path('tiny_xlstm'))[0])"

The saved folder is a paper checkpoint (config.json + model.safetensors) that mlx-lm loads.
"""

import argparse
import json
import sysconfig
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from mlx_lm_xlstm.paper import Model, ModelArgs


def config(dims: int) -> dict:
    """xLSTM[1:1]: blocks 0 (mLSTM) and 1 (sLSTM); byte vocabulary."""
    return {
        "model_type": "xlstm",
        "mlstm_block": {"mlstm": {"num_heads": 4, "conv1d_kernel_size": 4, "qkv_proj_blocksize": 4,
                                  "proj_factor": 2.0, "round_proj_up_to_multiple_of": 16}},
        "slstm_block": {"slstm": {"num_heads": 4, "conv1d_kernel_size": 4, "backend": "vanilla"},
                        "feedforward": {"proj_factor": 1.3, "act_fn": "gelu", "round_proj_up_to_multiple_of": 16}},
        "num_blocks": 2,
        "slstm_at": [1],
        "embedding_dim": dims,
        "vocab_size": 256,
        "tie_weights": True,
    }


def corpus(name: str) -> np.ndarray:
    path = Path(sysconfig.get_paths()["stdlib"]) / name
    return np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.int32)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--text", default="textwrap.py", help="a file of the Python standard library")
    parser.add_argument("--dims", type=int, default=64)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--sample-tokens", type=int, default=120)
    parser.add_argument("--save", default="", help="folder for the trained checkpoint ('' for none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    mx.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    data = corpus(args.text)
    split = int(0.9 * len(data))
    train, valid = data[:split], data[split:]
    cfg = config(args.dims)
    model = Model(ModelArgs.from_dict(dict(cfg)))
    print(f"{sum(v.size for _, v in tree_flatten(model.parameters())):,} parameters, {len(data):,} bytes of {args.text}")

    def batch(source, n):
        starts = rng.integers(0, len(source) - args.context - 1, size=n)
        return mx.array(np.stack([source[s : s + args.context + 1] for s in starts]))

    def loss_fn(model, seq):
        return nn.losses.cross_entropy(model(seq[:, :-1]), seq[:, 1:]).mean()

    optimizer = optim.AdamW(learning_rate=optim.cosine_decay(args.lr, max(args.steps, 1), 0.1 * args.lr))
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(seq):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, seq)
        optimizer.update(model, grads)
        return loss

    val = batch(valid, 16)
    print(f"valid loss before: {loss_fn(model, val).item():.3f} nats/byte")
    tic = time.perf_counter()
    for it in range(1, args.steps + 1):
        loss = step(batch(train, args.batch))
        mx.eval(state, loss)
        if it % max(1, args.steps // 10) == 0 or it == args.steps:
            print(f"step {it:5d}  train loss {loss.item():.3f}  ({time.perf_counter() - tic:.1f}s)", flush=True)
    print(f"valid loss after: {loss_fn(model, val).item():.3f} nats/byte")

    prompt = mx.array(list(args.prompt.encode()))
    sampler = make_sampler(temp=0.7)
    out = [t for (t, _), _ in zip(generate_step(prompt, model, sampler=sampler), range(args.sample_tokens))]
    print("sample:", repr(args.prompt + bytes(int(t) for t in out).decode("utf-8", errors="replace")))

    if args.save:
        folder = Path(args.save)
        folder.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        print(f"saved: {folder}")


if __name__ == "__main__":
    main()
