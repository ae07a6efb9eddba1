"""The mLSTM cell of xLSTM-7b in pure MLX: the reference path, and the fallback of the kernels.

Per head the state is C (Dqk, Dv), n (Dqk) and the stabiliser m (scalar), always fp32.
Gates, decays and the state are fp32; the chunkwise form's matmuls take bf16 inputs for a
bf16 model (fp32 accumulation, as NX-AI's TFLA kernels do): tensor cores make prefill fast.
The gates come in as `i` (the soft-capped input-gate pre-activation) and
`log_f` (logsigmoid of the soft-capped forget-gate pre-activation).
A masked step carries `i = MASKED_I` and `log_f = 0`: it leaves the state unchanged.
"""

import mlx.core as mx

# Finite rather than -inf: a chunk whose steps are all masked must stay NaN-free.
MASKED_I = -1e30


def mlstm_step(q, k, v, i, log_f, C, n, m, eps=1e-6):
    """One token.

    q, k: (B, H, Dqk); v: (B, H, Dv); i, log_f: (B, H);
    C: (B, H, Dqk, Dv); n: (B, H, Dqk); m: (B, H).
    Returns h (B, H, Dv) in fp32 and the new (C, n, m).
    """
    q, k, v = (x.astype(mx.float32) for x in (q, k, v))
    m_new = mx.maximum(log_f + m, i)
    f_act = mx.exp(log_f + m - m_new)
    i_act = mx.exp(i - m_new)
    C = f_act[..., None, None] * C + (i_act[..., None] * k)[..., :, None] * v[..., None, :]
    n = f_act[..., None] * n + i_act[..., None] * k
    q = q * q.shape[-1] ** -0.5
    num = (q[..., None, :] @ C).squeeze(-2)
    den = (q * n).sum(-1)
    h = num / (mx.maximum(mx.abs(den), mx.exp(-m_new)) + eps)[..., None]
    return h, (C, n, m_new)


def _segment_sums(g):
    """S[..., k, j] = g[j+1] + ... + g[k] for j <= k, -inf above the diagonal; summed
    directly rather than as a difference of cumulative sums, which would cancel."""
    n = g.shape[-1]
    x = mx.where(mx.tri(n, k=-1, dtype=mx.bool_), mx.repeat(g[..., None], n, axis=-1), 0.0)
    return mx.where(mx.tri(n, dtype=mx.bool_), mx.cumsum(x, axis=-2), -mx.inf)


def chunk_states(g, a_max, dC, dn, C, n, m):
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


def mlstm_chunkwise(q, k, v, i, log_f, C, n, m, chunk_size=64, eps=1e-6, states=chunk_states):
    """T tokens at once, in chunks: attention-like inside a chunk, recurrent between chunks.

    q, k: (B, H, T, Dqk); v: (B, H, T, Dv); i, log_f: (B, H, T); state as in `mlstm_step`.
    Any T: the last chunk is padded with masked steps, which leave the state as it is.
    `states` computes the chunk states (`chunk_states`, or a kernel of the same function).
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
