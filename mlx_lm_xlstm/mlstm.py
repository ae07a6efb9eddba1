"""The mLSTM cell of both architectures: `mlstm_update`, and its pure-MLX reference.

Per head the state is C (Dqk, Dv), n (Dqk) and the stabiliser m (scalar), always fp32.
Gates, decays and the state are fp32; the chunkwise form's matmuls take bf16 inputs for a
bf16 model (fp32 accumulation, as NX-AI's TFLA kernels do): tensor cores make prefill fast.
Calls of at most SHORT_CALL tokens (decode steps, speculative verify calls, short turns) run
in fp32; those of at most STEP_CALL tokens token by token in the step kernel where it applies
(one pass over the state for the whole call), the others chunkwise.
Inside the cell the gates are `i` (the input-gate pre-activation) and `log_f` (logsigmoid of
the forget-gate pre-activation). A masked step carries `i = MASKED_I` and `log_f = 0`: it
leaves the state unchanged.

`mlstm_step_ops`, `chunk_states_ops` and `mlstm_chunkwise_ops` are the reference: the
plain path (`MLX_XLSTM_KERNELS=0`), the fallback of the kernels, and their VJPs.
"""

import functools
import os
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from . import kernels, warm_up

# Finite rather than -inf: a chunk whose steps are all masked must stay NaN-free.
MASKED_I = -1e30
# The shortest piece the chunkwise form runs: shorter prompts are padded up to it.
MIN_PIECE = 16
# Calls of at most this many tokens run in fp32 even for a bf16 model (the chunkwise form
# in fp32 above STEP_CALL tokens).
SHORT_CALL = 64
# Calls of at most this many tokens run in the step kernel where it applies: a speculative
# verify call (up to 16 drafts + 1) then costs one pass over the state. Not longer ones:
# training differentiates the kernel through its token-by-token reference, whose memory
# grows by a state per token; the chunkwise form's does not.
STEP_CALL = 17


class GateProjection(nn.Module):
    """Gate pre-activations, one per head (and gate: xLSTM-7b holds the input and forget
    gates' in one, and reads them through `large.head_gates`), in fp32.

    Not an nn.Linear on purpose: without `to_quantized`, no quantization recipe of
    mlx-lm touches it, and the exponential gates stay exact.
    """

    def __init__(self, dims: int, outputs: int):
        super().__init__()
        scale = dims**-0.5  # nn.Linear's init
        self.weight = mx.random.uniform(-scale, scale, (outputs, dims))
        self.bias = mx.random.uniform(-scale, scale, (outputs,))

    def __call__(self, x):
        # A matmul and an add, not addmm: on CUDA, MLX takes a bias epilogue to cuBLAS and
        # a bare matrix-vector product to its own gemv.
        return x.astype(mx.float32) @ self.weight.astype(mx.float32).T + self.bias


def fast_path_enabled() -> bool:
    """False when the user forces the plain pure-MLX path with MLX_XLSTM_KERNELS=0, and while
    this machine builds the fast path's kernels in the background (`warm_up`)."""
    return os.environ.get("MLX_XLSTM_KERNELS", "1").strip() != "0" and not warm_up.waiting()


def log_sigmoid(x):
    """nn.log_sigmoid's function, not its `mx.compile`d function: the plain path compiles no kernel."""
    return -mx.logaddexp(-x, 0.0)


def mlstm_step_ops(q, k, v, i, log_f, C, n, m, eps=1e-6):
    """T tokens one after the other: the recurrent form.

    q, k: (B, T, H, Dqk); v: (B, T, H, Dv); i, log_f: (B, T, H);
    C: (B, H, Dqk, Dv); n: (B, H, Dqk); m: (B, H).
    Returns h (B, T, H, Dv) in fp32 and the new (C, n, m).
    """
    q, k, v = (x.astype(mx.float32) for x in (q, k, v))
    q = q * q.shape[-1] ** -0.5
    hs = []
    for t in range(q.shape[1]):
        m_new = mx.maximum(log_f[:, t] + m, i[:, t])
        f_act = mx.exp(log_f[:, t] + m - m_new)
        i_act = mx.exp(i[:, t] - m_new)
        k_t = i_act[..., None] * k[:, t]
        C = f_act[..., None, None] * C + k_t[..., :, None] * v[:, t, :, None, :]
        n = f_act[..., None] * n + k_t
        num = (q[:, t, :, None, :] @ C).squeeze(-2)
        den = (q[:, t] * n).sum(-1)
        hs.append(num / (mx.maximum(mx.abs(den), mx.exp(-m_new)) + eps)[..., None])
        m = m_new
    return mx.stack(hs, axis=1), (C, n, m)


def _segment_sums(g):
    """S[..., k, j] = g[j+1] + ... + g[k] for j <= k, -inf above the diagonal; summed
    directly rather than as a difference of cumulative sums, which would cancel."""
    n = g.shape[-1]
    x = mx.where(mx.tri(n, k=-1, dtype=mx.bool_), mx.repeat(g[..., None], n, axis=-1), 0.0)
    return mx.where(mx.tri(n, dtype=mx.bool_), mx.cumsum(x, axis=-2), -mx.inf)


def chunk_states_ops(g, a_max, dC, dn, C, n, m):
    """States entering each chunk, and the state after the last one, without a loop over chunks.

    g: (B, H, NC) log decay over each chunk; a_max: (B, H, NC) the stabiliser that
    dC (B, H, NC, Dqk, Dv) and dn (B, H, NC, Dqk) were computed with. With the initial
    state as contribution 0 (stabiliser m), the state after chunk k is
    sum_j<=k exp(a_j + g_j+1 + ... + g_k - m_k) * contribution_j, m_k the largest exponent;
    as a recurrence: m_k = max(g_k + m_k-1, a_k), C_k = e^(g_k + m_k-1 - m_k) C_k-1 + e^(a_k - m_k) dC_k.
    Returns ((C_in, n_in, m_in), (C, n, m)); C_in in dC's dtype (it feeds a matmul), the rest fp32.
    """
    B, H, NC = g.shape
    dC_dtype = dC.dtype
    dC = dC.astype(mx.float32)
    a = mx.concatenate([m[..., None], a_max], axis=-1)
    log_w = a[..., None, :] + _segment_sums(mx.concatenate([mx.zeros_like(m)[..., None], g], axis=-1))
    m_all = log_w.max(axis=-1)
    w = mx.exp(log_w - m_all[..., None])
    Cs = mx.concatenate([C[:, :, None], dC], axis=2)
    Cs = (w @ Cs.reshape(B, H, NC + 1, -1)).reshape(Cs.shape)
    ns = w @ mx.concatenate([n[:, :, None], dn], axis=2)
    C_in = Cs[:, :, :-1].astype(dC_dtype)
    return (C_in, ns[:, :, :-1], m_all[..., :-1]), (Cs[:, :, -1], ns[:, :, -1], m_all[..., -1])


def mlstm_chunkwise_ops(q, k, v, i, log_f, C, n, m, chunk_size=64, eps=1e-6, states=chunk_states_ops):
    """T tokens at once, in chunks: attention-like inside a chunk, recurrent between chunks.

    q, k: (B, H, T, Dqk); v: (B, H, T, Dv); i, log_f: (B, H, T); state as in `mlstm_step_ops`.
    Any T: the last chunk is padded with masked steps, which leave the state as it is.
    `states` computes the chunk states (`chunk_states_ops`, or a kernel of the same function).
    Returns h (B, H, T, Dv) in fp32 and the state after the last token.
    """
    B, H, T, Dqk = q.shape
    Dv = v.shape[-1]
    L = min(chunk_size, T)
    NC = -(-T // L)
    # Matmuls in bf16 for a bf16 model; fp16's range is too small for the state C.
    dt = mx.bfloat16 if q.dtype == k.dtype == v.dtype == mx.bfloat16 else mx.float32
    q, k, v = (x.astype(dt) for x in (q, k, v))
    if pad := NC * L - T:
        q, k, v = (mx.pad(x, [(0, 0), (0, 0), (0, pad), (0, 0)]) for x in (q, k, v))
        i = mx.pad(i, [(0, 0), (0, 0), (0, pad)], constant_values=MASKED_I)
        log_f = mx.pad(log_f, [(0, 0), (0, 0), (0, pad)])
    q = q.reshape(B, H, NC, L, Dqk) * Dqk**-0.5
    k = k.reshape(B, H, NC, L, Dqk)
    v = v.reshape(B, H, NC, L, Dv)
    i = i.reshape(B, H, NC, L)
    b = mx.cumsum(log_f.reshape(B, H, NC, L), axis=-1)
    g = b[..., -1]

    # What each chunk adds to the state, stabilised by its own largest gate.
    a = g[..., None] - b + i
    a_max = a.max(axis=-1)
    k_gated = k * mx.exp(a - a_max[..., None])[..., None]
    dC = k_gated.astype(dt).swapaxes(-1, -2) @ v
    dn = k_gated.sum(axis=-2)
    (C_in, n_in, m_in), state = states(g, a_max, dC, dn, C, n, m)

    # Inside a chunk: decay matrix D_tj = b_t - b_j + i_j for j <= t.
    log_D = b[..., :, None] - b[..., None, :] + i[..., None, :]
    log_D = mx.where(mx.tri(L, dtype=mx.bool_), log_D, -mx.inf)
    m_inter = b + m_in[..., None]
    m_comb = mx.maximum(m_inter, log_D.max(axis=-1))
    S = (q @ k.swapaxes(-1, -2)).astype(mx.float32) * mx.exp(log_D - m_comb[..., None])
    q_inter = q * mx.exp(m_inter - m_comb)[..., None]
    num = (q_inter.astype(dt) @ C_in).astype(mx.float32) + (S.astype(dt) @ v).astype(mx.float32)
    den = (q_inter @ n_in[..., None]).squeeze(-1) + S.sum(axis=-1)
    h = num / (mx.maximum(mx.abs(den), mx.exp(-m_comb)) + eps)[..., None]
    return h.reshape(B, H, NC * L, Dv)[:, :, :T], state


# The cell is many small elementwise ops around a few matmuls: compiling fuses them into
# far fewer launches. Traced once per shape: `pieces` keeps the shapes few.
_compiled_step = mx.compile(mlstm_step_ops)
_compiled_chunkwise = mx.compile(mlstm_chunkwise_ops)
_compiled_chunkwise_fused = mx.compile(functools.partial(mlstm_chunkwise_ops, states=kernels.chunk_states_kernel))


def _chunkwise(q, k, v, i, log_f, state, chunk_size, eps):
    if not fast_path_enabled():
        chunkwise = mlstm_chunkwise_ops
    elif kernels.chunk_states_kernel_applies(*state):
        chunkwise = _compiled_chunkwise_fused
    else:
        chunkwise = _compiled_chunkwise
    return chunkwise(q, k, v, i, log_f, *state, chunk_size=chunk_size, eps=eps)


def pieces(T: int, unit: int, max_piece: int, shortest: int = MIN_PIECE):
    """(tokens, padded length) of the pieces T tokens run in: whole units in power-of-two
    multiples (at most max_piece), then the rest padded with masked steps up to a power of
    two (at least `shortest`, at most a unit). Whatever T, the pieces take a few lengths:
    the cell's chunkwise form (unit: a chunk) is traced once per shape, and a prompt call on
    CUDA (`RecurrentModel.in_pieces`) meets CUDA graphs it has run before. Pieces of
    whole chunks keep the chunk boundaries of one pass. A rest of at least 7/8 of the next
    whole-unit length runs as one piece padded up to it: mlx-lm's last prefill step of a
    prompt is 2047 tokens, one 2048-token piece rather than six (H200, 7B shape: 64 ms
    instead of 87)."""
    out, left = [], T
    while left:
        if left >= unit:
            n = padded = min(unit << ((left // unit).bit_length() - 1), max_piece)
            longer = min(2 * n, max_piece)
            if n < left < longer and 8 * left >= 7 * longer:
                n, padded = left, longer
        else:
            n = min(left, max_piece)
            padded = min(max(shortest, 1 << (n - 1).bit_length()), unit)
        out.append((n, padded))
        left -= n
    return out


def _pad_steps(x, n: int, value=0.0):
    """x (B, H, T, ...) with n masked steps appended along T."""
    return mx.pad(x, [(0, 0), (0, 0), (0, n)] + [(0, 0)] * (x.ndim - 3), constant_values=value)


def zero_state(B: int, H: int, Dqk: int, Dv: int):
    """The state before the first token: (C, n, m) zeros, fp32."""
    return mx.zeros((B, H, Dqk, Dv), mx.float32), mx.zeros((B, H, Dqk), mx.float32), mx.zeros((B, H), mx.float32)


def mlstm_update(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    i: mx.array,
    log_f: mx.array,
    state: Optional[Tuple[mx.array, mx.array, mx.array]] = None,
    mask: Optional[mx.array] = None,
    *,
    chunk_size: int = 64,
    max_piece: int = 16384,
    eps: float = 1e-6,
    packed: Optional[Tuple[mx.array, Tuple[int, int, int]]] = None,
):
    """The mLSTM cell on T new tokens, as both architectures call it.

    q, k: (B, T, H, Dqk); v: (B, T, H, Dv); i: (B, T, H) the input gates' pre-activations;
    log_f: (B, T, H) the forget gates' log-sigmoid (`log_sigmoid` of their pre-activations:
    xLSTM-7b's come from a kernel with its projection, `large.head_gates`); state: (C, n, m)
    or None for the zero state; mask: (B, T) or None (masked steps leave the state as it is).
    Calls of at most STEP_CALL tokens run token by token in the step kernel where it
    applies; otherwise one token runs the recurrent step and more run chunkwise, in pieces
    of at most `max_piece` tokens (a working set bounded whatever the length, the same
    result as one pass). The fused kernels run where they apply, the compiled reference
    otherwise, and the plain reference with MLX_XLSTM_KERNELS=0. packed: optionally
    (qkv, (q_off, k_off, v_off)), q, k and v being those columns of qkv (B * T rows): the
    step kernel reads them there (xLSTM-7b's fused projection; their slices of a batch are
    not contiguous, and would be copied first).
    Returns h (B, T, H, Dv) in fp32 and the new state.
    """
    B, T, H, Dqk = q.shape
    if state is None:
        state = zero_state(B, H, Dqk, v.shape[-1])
    log_f = log_f.astype(mx.float32)
    i = i.astype(mx.float32)
    if mask is not None:
        i = mx.where(mask[..., None], i, MASKED_I)
        log_f = mx.where(mask[..., None], log_f, 0.0)
    if T <= STEP_CALL and fast_path_enabled() and kernels.mlstm_step_kernel_applies(q, k, v, i, log_f, *state):
        return kernels.mlstm_step_kernel(q, k, v, i, log_f, *state, eps=eps, packed=packed)
    if T == 1:
        step = _compiled_step if fast_path_enabled() else mlstm_step_ops
        return step(q, k, v, i, log_f, *state, eps=eps)
    q, k, v = (x.swapaxes(1, 2) for x in (q, k, v))
    i, log_f = i.swapaxes(1, 2), log_f.swapaxes(1, 2)
    if T <= SHORT_CALL:
        # As the step does: a speculative verify call then scores its tokens as decoding
        # them one by one would (bf16 matmuls flip near-tied greedy picks). Longer calls
        # (prompts) keep the bf16 matmuls, where tensor cores pay.
        q, k, v = (x.astype(mx.float32) for x in (q, k, v))

    hs, start = [], 0
    for n, padded in pieces(T, chunk_size, max_piece):
        piece = slice(start, start + n)
        args = [q[:, :, piece], k[:, :, piece], v[:, :, piece], i[..., piece], log_f[..., piece]]
        if padded > n:
            args = [_pad_steps(x, padded - n, MASKED_I if j == 3 else 0.0) for j, x in enumerate(args)]
        h, state = _chunkwise(*args, state, chunk_size, eps)
        hs.append(h[:, :, :n])
        start += n
    h = mx.concatenate(hs, axis=2) if len(hs) > 1 else hs[0]
    return h.swapaxes(1, 2), state
