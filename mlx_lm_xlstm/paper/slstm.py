"""The paper's sLSTM layer (`xlstm.blocks.slstm`, "vanilla" backend semantics).

Per head h: gates raw = W x_t + R_h y_{t-1} + b, in the order (i, f, z, o), then
    m_t = max(i_raw, m_{t-1} + logsigmoid(f_raw))   (m_t = i_raw while n is still 0)
    i = exp(i_raw - m_t),  f = exp(m_{t-1} + logsigmoid(f_raw) - m_t)
    c_t = f c_{t-1} + i tanh(z_raw),  n_t = f n_{t-1} + i,  y_t = sigmoid(o_raw) c_t / n_t.
The recurrence is sequential: the sequence path loops over steps (one graph, differentiable).
States y, c, n, m are kept in fp32.

Layout: `recurrent_kernel` (NH, DH_in, 4 * DH_out) with the gate index outermost in the
output (the reference's "cuda" layout), `bias` (NH, 4, DH); `Model.sanitize` permutes
checkpoints written by the "vanilla" backend.
"""


import mlx.core as mx
import mlx.nn as nn

from ..cache import StateSlots
from ..distributed import gather_channels, local_channels, split_channels
from ..mlstm import fast_path_enabled, log_sigmoid
from .components import CausalConv1d, LinearHeadwiseExpand, MultiHeadLayerNorm, silu

NUM_GATES = 4


def slstm_pointwise(raw, c, n, m):
    """raw: (B, NH, 4, DH) gate pre-activations; c, n, m: (B, NH, DH). Returns y, c, n, m."""
    i_raw, f_raw, z_raw, o_raw = (raw[..., g, :] for g in range(NUM_GATES))
    log_f_plus_m = m + log_sigmoid(f_raw)
    # The reference takes m = i_raw on its first step (n == 0): the same outputs, and no
    # exp overflow when f opens far more than i.
    m_new = mx.where(n == 0, i_raw, mx.maximum(i_raw, log_f_plus_m))
    # Both exponents are <= 0 except where n == 0, where f multiplies a zero state. The
    # reference clamps exp(.) at 1; clamping the exponent at 0 is the same value and keeps
    # exp (and its gradient) from overflowing to inf * 0 there.
    i = mx.exp(mx.minimum(i_raw - m_new, 0.0))
    f = mx.exp(mx.minimum(log_f_plus_m - m_new, 0.0))
    c_new = f * c + i * mx.tanh(z_raw)
    n_new = f * n + i
    return mx.sigmoid(o_raw) * c_new / n_new, c_new, n_new, m_new


def slstm_step(wx_t, R, state):
    """One step: wx_t (B, NH, 4, DH) input contributions with bias; state (y, c, n, m)."""
    B, NH, G, DH = wx_t.shape
    ry = (state[0][:, :, None, :] @ R).reshape(B, NH, G, DH)
    return slstm_pointwise(wx_t + ry, *state[1:])


# A step is a matmul and some twenty small ops: compiled, they fuse into a few launches.
# Training loops over the plain step: nesting a compiled step in the trainer's own
# mx.compile makes that compile ~10x slower for no gain.
slstm_step_compiled = mx.compile(slstm_step)


def slstm_sequence(wx, R, b, state, mask=None, compiled=False):
    """wx: (B, T, NH, 4, DH) input contributions; R: (NH, DH, 4 DH); b: (NH, 4, DH);
    state: (y, c, n, m), each (B, NH, DH) fp32; mask: (B, T) or None (masked steps keep the state).
    Returns y for every step (B, T, NH, DH) and the last state."""
    step = slstm_step_compiled if compiled else slstm_step
    wx = wx.astype(mx.float32) + b.astype(mx.float32)
    ys = []
    for t in range(wx.shape[1]):
        new = step(wx[:, t], R, state)
        if mask is not None:
            keep = mask[:, t, None, None]
            new = tuple(mx.where(keep, a, old) for a, old in zip(new, state))
        state = new
        ys.append(state[0])
    return mx.stack(ys, axis=1), state


def _forget_bias_powerlaw(head_dim: int, block_idx: int, num_blocks: int) -> mx.array:
    """The reference's "powerlaw_blockdependent" forget-gate bias init."""
    ratio = block_idx / (num_blocks - 1) if num_blocks > 1 else 0.0
    return -(-5.0 + 12.0 * (mx.arange(head_dim) / (head_dim - 1)) ** (0.3 + 1.3 * ratio))


class sLSTMCell(nn.Module):
    def __init__(self, dims: int, num_heads: int, block_idx: int, num_blocks: int):
        super().__init__()
        DH = dims // num_heads
        self.recurrent_kernel = mx.zeros((num_heads, DH, NUM_GATES * DH))
        bias = mx.zeros((num_heads, NUM_GATES, DH))
        bias[:, 1] = _forget_bias_powerlaw(DH, block_idx, num_blocks)
        self.bias = bias

    def __call__(self, wx, mask=None, state=None):
        if state is None:
            B, _, NH, _, DH = wx.shape
            state = tuple(mx.zeros((B, NH, DH), mx.float32) for _ in range(4))
        # Compiled for inference on the fast path; the plain step for training and MLX_XLSTM_KERNELS=0.
        compiled = fast_path_enabled() and not self.training
        return slstm_sequence(wx, self.recurrent_kernel, self.bias, state, mask, compiled)


class sLSTMLayer(nn.Module):
    """Optional causal conv + silu feeding the i and f gates; headwise gate projections;
    the cell; GroupNorm per head."""

    # Tensor parallel (`shard`): this rank's heads, on their channels of x.
    group = None

    def __init__(self, args, block_idx: int):
        super().__init__()
        cfg = args.slstm_block.slstm
        D, NH = args.embedding_dim, cfg.num_heads
        self.num_heads = NH
        if cfg.conv1d_kernel_size > 0:
            self.conv1d = CausalConv1d(D, cfg.conv1d_kernel_size)
        self.cache_slots = StateSlots(*(("conv",) if "conv1d" in self else ()), "y", "c", "n", "m")
        # The reference's module named `fgate` computes the input gate, `igate` the forget gate.
        self.fgate = LinearHeadwiseExpand(D, NH, False, init_dim=D)
        self.igate = LinearHeadwiseExpand(D, NH, False, init_dim=D)
        self.zgate = LinearHeadwiseExpand(D, NH, False, init_dim=D)
        self.ogate = LinearHeadwiseExpand(D, NH, False, init_dim=D)
        self.slstm_cell = sLSTMCell(D, NH, block_idx, args.num_blocks)
        self.group_norm = MultiHeadLayerNorm(NH, D // NH, weight=cfg.group_norm_weight)
        self.dropout = nn.Dropout(args.dropout)

    def __call__(self, x, mask=None, cache=None):
        if self.group is not None:
            x = local_channels(x, self.group)
        B, T, _ = x.shape
        x_conv, conv_in = x, None
        if "conv1d" in self:
            conv_in = x if mask is None else mx.where(mask[..., None], x, 0)
            x_conv, conv_state = self.conv1d(conv_in, self.cache_slots.read(cache, "conv"), mask)
            x_conv = silu(x_conv)
            self.cache_slots.write(cache, conv=conv_state)

        heads = lambda g: g.reshape(B, T, self.num_heads, 1, -1)
        gates = (self.fgate(x_conv), self.igate(x_conv), self.zgate(x), self.ogate(x))
        wx = mx.concatenate([heads(g) for g in gates], axis=3)
        self.cache_slots.keep(cache, wx=wx, conv_in=conv_in, mask=mask)
        y, (y_last, c, n, m) = self.slstm_cell(wx, mask, self.cache_slots.read(cache, "y", "c", "n", "m"))
        self.cache_slots.write(cache, y=y_last, c=c, n=n, m=m)
        y = self.group_norm(self.dropout(y)).astype(x.dtype)
        return y if self.group is None else gather_channels(y, self.group)

    def replay(self, cache, wx, conv_in=None, mask=None):
        """The convolution's and the cell's state after these kept inputs, from those in
        `cache` (a trim re-runs the tokens it keeps)."""
        if conv_in is not None:
            _, conv_state = self.conv1d(conv_in, self.cache_slots.read(cache, "conv"), mask)
            self.cache_slots.write(cache, conv=conv_state)
        _, (y, c, n, m) = self.slstm_cell(wx, mask, self.cache_slots.read(cache, "y", "c", "n", "m"))
        self.cache_slots.write(cache, y=y, c=c, n=n, m=m)

    def shard(self, group: mx.distributed.Group):
        """This rank's heads on their channels of the replicated input; outputs gathered."""
        for part in (self.fgate, self.igate, self.zgate, self.ogate, self.slstm_cell, self.group_norm):
            split_channels(part, group)
        if "conv1d" in self:
            self.conv1d.shard(group)
        self.num_heads //= group.size()
        self.group = group
