"""The paper's mLSTM layer (pre-up-projection block of Beck et al. 2024; `xlstm.blocks.mlstm`).

The cell is `mlx_lm_xlstm.mlstm.mlstm_update`, as xLSTM-7b's: the paper's cell has the same
recurrence with no soft caps, i = igate pre-activation, log f = logsigmoid(fgate
pre-activation), eps 1e-6 after the max. The reference scales k by 1/sqrt(DH) where ours
scales q: every q.k product, hence every output, is the same; only the stored C and n
differ by that constant. Its parallel form stabilises as if m started at -inf while our
zero cache starts at 0; outputs differ only through eps * exp(m) in the denominator (~1e-6
relative, inside the 1e-4 parity tolerance).
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

from ..cache import StateSlots
from ..distributed import HeadGatesFromShards, local_channels, split_channels
from ..mlstm import GateProjection, log_sigmoid, mlstm_update
from .components import CausalConv1d, LinearHeadwiseExpand, MultiHeadLayerNorm, silu, small_init, wang_init

CHUNK_SIZE = 64


class mLSTMCell(nn.Module):
    def __init__(self, inner_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.igate = GateProjection(3 * inner_dim, num_heads)
        self.fgate = GateProjection(3 * inner_dim, num_heads)
        # Reference init: gates start from their biases; forget gates open (3..6).
        self.igate.weight = mx.zeros_like(self.igate.weight)
        self.igate.bias = 0.1 * mx.random.normal((num_heads,))
        self.fgate.weight = mx.zeros_like(self.fgate.weight)
        self.fgate.bias = mx.linspace(3.0, 6.0, num_heads)
        self.outnorm = MultiHeadLayerNorm(num_heads, inner_dim // num_heads)

    def __call__(self, q, k, v, mask=None, state=None):
        """q, k, v: (B, T, inner); state (C, n, m) or None. Returns GN(h) (B, T, inner) fp32, state."""
        B, T, _ = q.shape
        gate_in = mx.concatenate([q, k, v], axis=-1)
        heads = lambda y: y.reshape(B, T, self.num_heads, -1)
        h, state = mlstm_update(
            heads(q), heads(k), heads(v), self.igate(gate_in), log_sigmoid(self.fgate(gate_in)), state, mask,
            chunk_size=CHUNK_SIZE,
        )
        return self.outnorm(h), state

    def shard(self, group: mx.distributed.Group):
        """This rank's heads; the gates read q, k, v of all heads, so their partial
        pre-activations are summed over the group."""
        self.igate, self.fgate = HeadGatesFromShards(self.igate, group), HeadGatesFromShards(self.fgate, group)
        split_channels(self.outnorm, group)
        self.num_heads //= group.size()


class mLSTMLayer(nn.Module):
    """up-project to [x, z]; q, k from silu(conv(x)), v from x; cell; (GN(h) + skip * conv) * silu(z);
    down-project."""

    def __init__(self, args):
        super().__init__()
        cfg = args.mlstm_block.mlstm
        D, inner, bias = args.embedding_dim, args.mlstm_inner_dim, args.bias
        self.inner_dim = inner
        self.cache_slots = StateSlots("conv", "C", "n", "m")
        self.proj_up = nn.Linear(D, 2 * inner, bias=bias)
        blocks = inner // cfg.qkv_proj_blocksize
        self.q_proj = LinearHeadwiseExpand(inner, blocks, bias, init_dim=D)
        self.k_proj = LinearHeadwiseExpand(inner, blocks, bias, init_dim=D)
        self.v_proj = LinearHeadwiseExpand(inner, blocks, bias, init_dim=D)
        self.conv1d = CausalConv1d(inner, cfg.conv1d_kernel_size)
        self.mlstm_cell = mLSTMCell(inner, cfg.num_heads)
        self.learnable_skip = mx.ones((inner,))
        self.proj_down = nn.Linear(inner, D, bias=bias)
        self.proj_up.weight = small_init(self.proj_up.weight.shape, D)
        self.proj_down.weight = wang_init(self.proj_down.weight.shape, D, args.num_blocks)
        if bias:
            self.proj_up.bias = mx.zeros_like(self.proj_up.bias)
            self.proj_down.bias = mx.zeros_like(self.proj_down.bias)
        self.dropout = nn.Dropout(args.dropout)

    def __call__(self, x, mask=None, cache=None):
        x_mlstm, z = mx.split(self.proj_up(x), [self.inner_dim], axis=-1)
        conv_in = x_mlstm if mask is None else mx.where(mask[..., None], x_mlstm, 0)
        x_conv, conv_state = self.conv1d(conv_in, self.cache_slots.read(cache, "conv"), mask)
        x_conv = silu(x_conv)
        q, k, v = self.q_proj(x_conv), self.k_proj(x_conv), self.v_proj(x_mlstm)
        self.cache_slots.keep(cache, conv_in=conv_in, q=q, k=k, v=v, mask=mask)
        h, (C, n, m) = self.mlstm_cell(q, k, v, mask, self.cache_slots.read(cache, "C", "n", "m"))
        self.cache_slots.write(cache, conv=conv_state, C=C, n=n, m=m)
        h = h.astype(x.dtype) + self.learnable_skip * x_conv
        return self.dropout(self.proj_down(h * silu(z)))

    def replay(self, cache, conv_in, q, k, v, mask=None):
        """The convolution's and the cell's state after these kept inputs, from those in
        `cache` (a trim re-runs the tokens it keeps)."""
        _, conv_state = self.conv1d(conv_in, self.cache_slots.read(cache, "conv"), mask)
        _, (C, n, m) = self.mlstm_cell(q, k, v, mask, self.cache_slots.read(cache, "C", "n", "m"))
        self.cache_slots.write(cache, conv=conv_state, C=C, n=n, m=m)

    def shard(self, group: mx.distributed.Group):
        """This rank's heads: its slice of both up-projection halves, conv channels, q/k/v
        blocks, cell, and skip; proj_down sums over the group."""
        self.proj_up = shard_linear(self.proj_up, "all-to-sharded", segments=2, group=group)
        for part in (self.q_proj, self.k_proj, self.v_proj):
            split_channels(part, group)
        self.conv1d.shard(group)
        self.mlstm_cell.shard(group)
        self.learnable_skip = local_channels(self.learnable_skip, group)
        self.inner_dim //= group.size()
        self.proj_down = shard_linear(self.proj_down, "sharded-to-all", group=group)
