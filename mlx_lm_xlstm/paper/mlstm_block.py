"""The paper's mLSTM layer (pre-up-projection block of Beck et al. 2024; `xlstm.blocks.mlstm`).

The cell is our pure-MLX mLSTM (`mlx_lm_xlstm.mlstm`): the paper's cell has the same
recurrence with no soft caps, i = igate pre-activation, log f = logsigmoid(fgate
pre-activation), eps 1e-6 after the max. The reference scales k by 1/sqrt(DH) where ours
scales q: every q.k product, hence every output, is the same; only the stored C and n
differ by that constant. Its parallel form stabilises as if m started at -inf while our
zero cache starts at 0; outputs differ only through eps * exp(m) in the denominator (~1e-6
relative, inside the 1e-4 parity tolerance).
"""

import mlx.core as mx
import mlx.nn as nn

from ..large import GateProjection
from ..mlstm import MASKED_I, mlstm_chunkwise, mlstm_step
from .components import CausalConv1d, LinearHeadwiseExpand, MultiHeadLayerNorm, small_init, wang_init

CHUNK_SIZE = 64


class mLSTMCell(nn.Module):
    def __init__(self, inner_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.chunk_size = CHUNK_SIZE
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
        H = self.num_heads
        gate_in = mx.concatenate([q, k, v], axis=-1)
        i = self.igate(gate_in)
        log_f = nn.log_sigmoid(self.fgate(gate_in))
        if mask is not None:
            i = mx.where(mask[..., None], i, MASKED_I)
            log_f = mx.where(mask[..., None], log_f, 0.0)
        i, log_f = i.swapaxes(1, 2), log_f.swapaxes(1, 2)
        heads = lambda y: y.reshape(B, T, H, -1).swapaxes(1, 2)
        q, k, v = heads(q), heads(k), heads(v)
        if state is None:
            D = q.shape[-1]
            state = (
                mx.zeros((B, H, D, D), mx.float32),
                mx.zeros((B, H, D), mx.float32),
                mx.zeros((B, H), mx.float32),
            )
        if T == 1:
            h, state = mlstm_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[..., 0], log_f[..., 0], *state)
            h = h[:, :, None]
        else:
            h, state = mlstm_chunkwise(q, k, v, i, log_f, *state, chunk_size=self.chunk_size)
        return self.outnorm(h.swapaxes(1, 2)), state


class mLSTMLayer(nn.Module):
    """up-project to [x, z]; q, k from silu(conv(x)), v from x; cell; (GN(h) + skip * conv) * silu(z);
    down-project. Cache slots: conv state, C, n, m."""

    cache_size = 4

    def __init__(self, args):
        super().__init__()
        cfg = args.mlstm_block.mlstm
        D, inner, bias = args.embedding_dim, args.mlstm_inner_dim, args.bias
        self.inner_dim = inner
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
        T = x.shape[1]
        x_mlstm, z = mx.split(self.proj_up(x), [self.inner_dim], axis=-1)
        conv_in = x_mlstm if mask is None else mx.where(mask[..., None], x_mlstm, 0)
        if cache is not None:
            x_conv, conv_state = self.conv1d(conv_in, cache[0], cache.lengths)
            state = None if cache[1] is None else (cache[1], cache[2], cache[3])
        else:
            x_conv, _ = self.conv1d(conv_in)
            state = None
        x_conv = nn.silu(x_conv)
        q, k, v = self.q_proj(x_conv), self.k_proj(x_conv), self.v_proj(x_mlstm)
        h, state = self.mlstm_cell(q, k, v, mask, state)
        if cache is not None:
            cache[0] = conv_state
            cache[1], cache[2], cache[3] = state
            cache.advance(T)
        h = h.astype(x.dtype) + self.learnable_skip * x_conv
        return self.dropout(self.proj_down(h * nn.silu(z)))
