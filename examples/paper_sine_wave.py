"""Fit sine waves with the paper's xLSTM blocks (an mLSTM block and an sLSTM block).

Each sequence is sin(w t + phase) with a random frequency; the model reads the values so
far and predicts the next one. It must infer the frequency from the sequence it has seen,
which needs memory. Saves a plot of the fit (needs matplotlib, used by this example only).

    python examples/paper_sine_wave.py --steps 300 --plot sine_fit.png
    python examples/paper_sine_wave.py --blocks s      # an sLSTM block alone
"""

import argparse
import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from mlx_lm_xlstm.paper.model import ModelArgs, xLSTMBlockStack


def make_args(blocks: str, dims: int) -> ModelArgs:
    """A config.json-style dict of the paper's xLSTMBlockStackConfig; `blocks` like "ms"."""
    return ModelArgs.from_dict({
        "model_type": "xlstm",
        "mlstm_block": {"mlstm": {"num_heads": 2, "conv1d_kernel_size": 4, "qkv_proj_blocksize": 4,
                                  "proj_factor": 2.0, "round_proj_up_to_multiple_of": 16}},
        "slstm_block": {"slstm": {"num_heads": 2, "conv1d_kernel_size": 4, "backend": "vanilla"},
                        "feedforward": {"proj_factor": 1.3, "act_fn": "gelu", "round_proj_up_to_multiple_of": 16}},
        "num_blocks": len(blocks),
        "slstm_at": [i for i, b in enumerate(blocks) if b == "s"],
        "embedding_dim": dims,
        "vocab_size": 1,  # unused: values come in through a linear map, not an embedding
    })


class SineModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.proj_in = nn.Linear(1, args.embedding_dim)
        self.stack = xLSTMBlockStack(args)
        self.proj_out = nn.Linear(args.embedding_dim, 1)

    def __call__(self, x):
        return self.proj_out(self.stack(self.proj_in(x[..., None])))[..., 0]


def sine_batch(rng, batch: int, length: int):
    w = rng.uniform(0.1, 0.5, size=(batch, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(batch, 1))
    return mx.array(np.sin(w * np.arange(length + 1) + phase).astype(np.float32))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--blocks", default="ms", help="block types in order: m = mLSTM, s = sLSTM")
    parser.add_argument("--dims", type=int, default=32)
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--plot", default="sine_fit.png", help="PNG path ('' for none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.blocks or set(args.blocks) - {"m", "s"}:
        parser.error("--blocks takes letters m and s, e.g. 'ms'")

    mx.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = SineModel(make_args(args.blocks, args.dims))
    optimizer = optim.Adam(learning_rate=args.lr)

    def loss_fn(model, seq):
        return nn.losses.mse_loss(model(seq[:, :-1]), seq[:, 1:])

    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(seq):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, seq)
        optimizer.update(model, grads)
        return loss

    test = sine_batch(np.random.default_rng(12345), 4, args.length)
    first = loss_fn(model, test).item()
    tic = time.perf_counter()
    for it in range(1, args.steps + 1):
        loss = step(sine_batch(rng, args.batch, args.length))
        mx.eval(state, loss)
        if it % max(1, args.steps // 10) == 0 or it == args.steps:
            print(f"step {it:5d}  train mse {loss.item():.5f}  ({time.perf_counter() - tic:.1f}s)", flush=True)
    final = loss_fn(model, test).item()
    print(f"test mse: before {first:.5f}  after {final:.5f}")

    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot")
            return
        pred = np.array(model(test[:, :-1]))
        target = np.array(test[:, 1:])
        fig, axes = plt.subplots(len(target), 1, figsize=(8, 1.6 * len(target)), sharex=True)
        for ax, p, t in zip(axes, pred, target):
            ax.plot(t, label="target", lw=2, alpha=0.5)
            ax.plot(p, label="prediction", lw=1)
        axes[0].legend(loc="upper right")
        axes[0].set_title(f"next-value prediction, blocks '{args.blocks}', test mse {final:.4f}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=80)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
