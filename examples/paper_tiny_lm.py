"""Train a tiny xLSTM[1:1] language model (one mLSTM and one sLSTM block, the paper's
architecture) from scratch on the bytes of a Python standard-library source file, then
sample from it with mlx-lm's generation loop (recurrent caches, step decode).

    python examples/paper_tiny_lm.py --steps 300 --save tiny_xlstm
    python -m mlx_lm generate --model tiny_xlstm --prompt "def " --ignore-chat-template

The tokens are bytes: a byte-level tokenizer without merges (256 bytes and <|endoftext|>,
<|padding|>). The saved folder is a paper checkpoint (config.json, weights, that tokenizer)
that mlx-lm's tools load.
"""

import argparse
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
from mlx_lm_xlstm.save import byte_level_tokenizer, save_checkpoint

BYTES = 256 + 2  # every byte, <|endoftext|> and <|padding|>: no merges


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
        "vocab_size": BYTES,
        "tie_weights": True,
    }


def corpus(name: str, tokenizer) -> np.ndarray:
    text = (Path(sysconfig.get_paths()["stdlib"]) / name).read_text(encoding="utf-8")
    return np.array(tokenizer.encode(text), dtype=np.int32)


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
    tokenizer = byte_level_tokenizer(BYTES)
    data = corpus(args.text, tokenizer)
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

    prompt = mx.array(tokenizer.encode(args.prompt))
    sampler = make_sampler(temp=0.7)
    out = [t for (t, _), _ in zip(generate_step(prompt, model, sampler=sampler), range(args.sample_tokens))]
    print("sample:", repr(args.prompt + tokenizer.decode(out)))

    if args.save:
        save_checkpoint(args.save, model, cfg, tokenizer=tokenizer, overwrite=True)
        print(f"saved: {args.save}")


if __name__ == "__main__":
    main()
