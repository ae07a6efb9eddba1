"""Building blocks shared by the paper's mLSTM and sLSTM blocks (NX-AI `xlstm.components`).

Parameters keep the reference's names and layouts, except the causal convolution's
weight, which is MLX's (dims, kernel, 1) (see `Model.sanitize`).
"""

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

from ..distributed import split_channels


def small_init(shape, dim: int) -> mx.array:
    """Normal init of "Transformers without Tears" (std sqrt(2 / (5 dim))), as `small_init_init_`."""
    return mx.random.normal(shape) * math.sqrt(2 / (5 * dim))


def wang_init(shape, dim: int, num_blocks: int) -> mx.array:
    """Normal init with std 2 / num_blocks / sqrt(dim), as `wang_init_`."""
    return mx.random.normal(shape) * (2 / num_blocks / math.sqrt(dim))


def proj_up_dim(factor: float, dim: int, multiple_of: int, round_up: bool) -> int:
    """`UpProjConfigMixin._set_proj_up_dim`: factor * dim rounded to a multiple."""
    steps = factor * dim / multiple_of
    return int((math.ceil(steps) if round_up else math.floor(steps)) * multiple_of)


class LayerNorm(nn.Module):
    """LayerNorm without bias whose stored weight w scales by (1 + w); eps 1e-5."""

    def __init__(self, dims: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = mx.zeros((dims,))

    def __call__(self, x):
        return mx.fast.layer_norm(x, 1 + self.weight, None, self.eps)


class MultiHeadLayerNorm(nn.Module):
    """GroupNorm with one group per head: LayerNorm over each head's values, weight (1 + w)."""

    def __init__(self, num_heads: int, head_dim: int, weight: bool = True, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        if weight:
            self.weight = mx.zeros((num_heads * head_dim,))

    def __call__(self, h):
        """h: (B, T, NH, DH) -> (B, T, NH * DH)."""
        B, T, _, _ = h.shape
        y = mx.fast.layer_norm(h, None, None, self.eps).reshape(B, T, -1)
        return y * (1 + self.weight) if "weight" in self else y


class LinearHeadwiseExpand(nn.Module):
    """Block-diagonal linear map: each of `num_heads` slices of the features has its own
    square matrix. weight: (heads, out, in) as in the reference."""

    def __init__(self, dims: int, num_heads: int, bias: bool, init_dim: int):
        super().__init__()
        if dims % num_heads:
            raise ValueError(f"xLSTM config: {dims} features do not split into {num_heads} blocks")
        d = dims // num_heads
        self.weight = small_init((num_heads, d, d), init_dim)
        if bias:
            self.bias = mx.zeros((dims,))

    def __call__(self, x):
        heads, _, d = self.weight.shape
        y = x.reshape(*x.shape[:-1], heads, 1, d) @ self.weight.swapaxes(-1, -2)
        y = y.reshape(x.shape)
        return y + self.bias if "bias" in self else y


class CausalConv1d(nn.Module):
    """Depthwise causal convolution with bias. The state is the last kernel_size - 1 inputs."""

    def __init__(self, dims: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(dims, dims, kernel_size, groups=dims, bias=True)

    def __call__(self, x, state=None, mask=None):
        """x: (B, T, D), masked steps already zeroed; state: (B, K-1, D) or None (zeros);
        mask: (B, T) or None. Returns (y, the state after each row's last valid step):
        masked steps after it (a batch's shorter prompt, a prompt piece's padding) leave it."""
        B, T, D = x.shape
        keep = self.kernel_size - 1
        if state is None:
            state = mx.zeros((B, keep, D), dtype=x.dtype)
        padded = mx.concatenate([state, x], axis=1)
        if mask is not None:
            ends = mx.where(mask.any(axis=1), T - mx.argmax(mask[:, ::-1].astype(mx.int32), axis=1), 0)
            new_state = mx.take_along_axis(padded, (ends[:, None] + mx.arange(keep))[..., None], axis=1)
        else:
            new_state = padded[:, T:]
        return self.conv(padded), new_state

    def shard(self, group: mx.distributed.Group):
        split_channels(self, group)
        self.conv.groups //= group.size()  # depthwise: one group per channel


# MLX's activations as plain functions, not their `mx.compile`d ones (the same ops): a
# machine's first run, on the plain path, compiles no kernel (`mlx_lm_xlstm.warm_up`), and the
# compiled decode step fuses them anyway.
def silu(x):
    return x * mx.sigmoid(x)


def gelu(x):
    return x * (1 + mx.erf(x / math.sqrt(2))) / 2


def selu(x):
    return mx.where(x > 0, x, 1.67326 * (mx.exp(x) - 1)) * 1.0507


_ACTIVATIONS = {
    "gelu": gelu,
    "relu": lambda x: mx.maximum(x, 0),
    "relu^2": lambda x: mx.square(mx.maximum(x, 0)),
    "sigmoid": mx.sigmoid,
    "swish": silu,
    "selu": selu,
}


class GatedFeedForward(nn.Module):
    """proj_down(act(gate) * up) with [gate, up] = proj_up(x)."""

    def __init__(self, dims: int, hidden: int, act_fn: str, bias: bool, dropout: float, num_blocks: int):
        super().__init__()
        self.hidden = hidden
        self.act_fn = act_fn
        self.proj_up = nn.Linear(dims, 2 * hidden, bias=bias)
        self.proj_down = nn.Linear(hidden, dims, bias=bias)
        self.proj_up.weight = small_init(self.proj_up.weight.shape, dims)
        self.proj_down.weight = wang_init(self.proj_down.weight.shape, dims, num_blocks)
        if bias:
            self.proj_up.bias = mx.zeros_like(self.proj_up.bias)
            self.proj_down.bias = mx.zeros_like(self.proj_down.bias)
        self.dropout = nn.Dropout(dropout)

    def __call__(self, x):
        gate, up = mx.split(self.proj_up(x), [self.hidden], axis=-1)
        return self.dropout(self.proj_down(_ACTIVATIONS[self.act_fn](gate) * up))

    def shard(self, group: mx.distributed.Group):
        self.proj_up = shard_linear(self.proj_up, "all-to-sharded", segments=2, group=group)
        self.proj_down = shard_linear(self.proj_down, "sharded-to-all", group=group)
        self.hidden //= group.size()
