"""Fused mLSTM recurrent step (decode), one kernel for Metal and one for CUDA, same algorithm.

Decode is bound by memory traffic: per sequence and layer the state C is 4 MiB (xLSTM-7b),
and the ops path reads and writes it several times. The kernel reads C once and writes the
new C once, and forms the readout q·C and the denominator q·n on the way.

Work split: a threadgroup of 32 x ROWS threads owns one (sequence, head) and 32 value
columns; thread (x, y) walks the rows y, y + ROWS, ... of C for its column, so each warp
reads 128 contiguous bytes a row. The ROWS partial readouts meet in threadgroup memory.
Every threadgroup recomputes the gates, n and q·n of its head (Dqk values, cheap);
the one that owns column 0 writes n and m.
"""

import mlx.core as mx

from . import cuda
from .spelling import CUDA, METAL, spell

ROWS = 8  # row slices of C per threadgroup: threadgroup = 32 x ROWS threads

# Shared by both backends: only the spellings differ (spelling.py).
_BODY = """
    const uint bh = GID_Z;
    const uint x = TID_X;
    const uint y = TID_Y;
    const uint d = GID_X;
    const bool live = d < DV;

    const float m_prev = m[bh];
    const float lf = log_f[bh];
    const float ig = i[bh];
    const float m_new = MAX(lf + m_prev, ig);
    const float f_act = EXP(lf + m_prev - m_new);
    const float i_act = EXP(ig - m_new);
    const float scale = RSQRT(float(DQK));

    const float v_d = live ? float(v[bh * DV + d]) : 0.0f;
    float num = 0.0f;
    float den = 0.0f;
    for (uint a = y; a < DQK; a += ROWS) {
        const float k_a = i_act * float(k[bh * DQK + a]);
        const float q_a = scale * float(q[bh * DQK + a]);
        const float n_a = f_act * n[bh * DQK + a] + k_a;
        den += q_a * n_a;
        if (d == 0) {
            n_out[bh * DQK + a] = n_a;
        }
        if (live) {
            const size_t at = ((size_t)bh * DQK + a) * DV + d;
            const float c = f_act * C[at] + k_a * v_d;
            C_out[at] = c;
            num += q_a * c;
        }
    }

    SHARED float num_part[ROWS][32];
    SHARED float den_part[ROWS];
    num_part[y][x] = num;
    if (x == 0) {
        den_part[y] = den;
    }
    BARRIER;
    if (y == 0 && live) {
        float total = 0.0f;
        float q_n = 0.0f;
        for (uint r = 0; r < ROWS; ++r) {
            total += num_part[r][x];
            q_n += den_part[r];
        }
        h[bh * DV + d] = total / (MAX(ABS(q_n), EXP(-m_new)) + eps[0]);
        if (d == 0) {
            m_out[bh] = m_new;
        }
    }
"""


def source(backend: dict) -> str:
    """The kernel body for one backend (`spelling.METAL` or `spelling.CUDA`)."""
    return spell(_BODY.replace("ROWS", str(ROWS)), backend)


INPUTS = ["q", "k", "v", "i", "log_f", "C", "n", "m", "eps"]
OUTPUTS = ["h", "C_out", "n_out", "m_out"]


def _build():
    if mx.metal.is_available():
        return mx.fast.metal_kernel("mlstm_step", INPUTS, OUTPUTS, source(METAL))
    if mx.cuda.is_available():
        return cuda.Kernel("mlstm_step", INPUTS, OUTPUTS, source(CUDA))
    return None


# The kernel built for this machine; `kernel` is what runs (tests stand another one in).
BUILT = kernel = _build()


def launch(kernel, q, k, v, i, log_f, C, n, m, eps, verbose=False):
    """Run `kernel` (built from this module's source) on one decode step; shapes as in
    `mlx_lm_xlstm.mlstm.mlstm_step_ops`. Returns h (B, H, Dv) fp32 and the new (C, n, m)."""
    B, H, Dqk, Dv = C.shape
    f32 = mx.float32
    columns = -(-Dv // 32) * 32
    h, C, n, m = kernel(
        inputs=[q, k, v, i.astype(f32), log_f.astype(f32), C, n, m, mx.array([eps], f32)],
        template=[("DQK", Dqk), ("DV", Dv)],
        grid=(columns, ROWS, B * H),
        threadgroup=(32, ROWS, 1),
        output_shapes=[(B, H, Dv), C.shape, n.shape, m.shape],
        output_dtypes=[f32] * 4,
        verbose=verbose,
    )
    return h, (C, n, m)
