"""Fused mLSTM recurrence (decode, and short calls such as a speculative verify call), one
kernel for Metal and one for CUDA, same algorithm: `mlx_lm_xlstm.mlstm.mlstm_step_ops`.

Decode is bound by memory traffic: per sequence and layer the state C is 4 MiB (xLSTM-7b),
and the ops path reads and writes it several times. The kernel reads C once into registers,
runs all the call's tokens on it (STEPS: 1 when decoding, k + 1 for a verify call, which
so costs about one step), and writes the new C once.

Work split: a threadgroup of 32 x ROWS threads owns one (sequence, head) and 32 value
columns; thread (x, y) keeps the rows y, y + ROWS, ... of C for its column (each warp reads
128 contiguous bytes a row). Every load a token needs (its rows of C, k, q, their n, v, the
gates) is issued before the first use, so they are in flight together, and a token costs
one barrier: each thread reads k and q of its rows itself (a warp's lanes read the same
element, one transaction), lane x of a warp keeps n of its warp's row j = x (j the row's
slot in the thread's rows), the warp sums its q·n by shuffles, and the ROWS partials of
q·C and q·n meet in threadgroup memory (double-buffered across tokens). Before, the
threadgroup staged k, q and n in threadgroup memory (one thread a row) behind a barrier and
read v after it: three barriers a token, and at batch 1 (7B shape, H200, ncu) a call took
21 us, its warps waiting at barriers 71% of the time (4% of the memory bandwidth).
Few registers a thread (its rows of C only) keep many threadgroups resident: at ROWS = 8
with n and q, k in registers too, a thread took 137 registers, one threadgroup fitted an
SM, and the kernel reached 3.5% (batch 1) and 19% (batch 16) of the H200's memory
bandwidth (ncu). On CUDA the launch bounds cap a thread at 64 registers (from 72), so that
two threadgroups share an SM: one computes while the other waits on its loads (7B shape,
H200: the batch-16 cell from 117 to 98 us a layer, batch-16 decode +15-25%, batch 1 level).
The threadgroup that owns column 0 writes n and m. Inputs and h are in the model's
(B, T, H, D) layout (no transposes); q, k and v may be columns of one wider array (a token's
row Q_STRIDE elements long, q from column Q_OFF, and so on): xLSTM-7b's fused projection,
read in place (at batch > 1 their slices are not contiguous, and would be copied first).
STEPS is a launch argument (one binary for every call length).
"""

import mlx.core as mx

from . import gpu
from .spelling import spell

ROWS = 16  # row slices of C per threadgroup: threadgroup = 32 x ROWS threads

# Shared by both backends: only the spellings differ (spelling.py).
# MLX's CUDA backend hashes the whole binary at every launch (~0.5 us a KB): loops whose unrolling only adds code stay rolled.
_BODY = """
    const uint bh = GID_Z;
    const uint b = bh / NH;
    const uint head = bh % NH;
    const uint x = TID_X;
    const uint y = TID_Y;
    const uint d = GID_X;
    const bool live = DV % 32 == 0 || d < DV;  // columns come in whole warps
    const float scale = RSQRT(float(DQK));
    constexpr uint PER_THREAD = (DQK + ROWS - 1) / ROWS;
    constexpr bool ALL_ROWS = DQK % ROWS == 0;  // y < ROWS: every row y + j * ROWS is < DQK
    constexpr uint OWNED = (PER_THREAD + 31) / 32;  // rows of n lane x keeps: slots j = x, x + 32, ...

    // A token's partial sums, double-buffered: one barrier a token.
    SHARED float num_part[2][ROWS][32];
    SHARED float den_part[2][ROWS];

    float c[PER_THREAD];
    float n_own[OWNED];
    #pragma unroll
    for (uint j = 0; j < PER_THREAD; ++j) {
        const uint a = y + j * ROWS;
        c[j] = (live && (ALL_ROWS || a < DQK)) ? C[((size_t)bh * DQK + a) * DV + d] : 0.0f;
    }
    for (uint o = 0; o < OWNED; ++o) {
        const uint a = y + (x + 32 * o) * ROWS;
        n_own[o] = (x + 32 * o < PER_THREAD && a < DQK) ? n[bh * DQK + a] : 0.0f;
    }
    float m_run = m[bh];

    for (uint t = 0; t < STEPS; ++t) {
        const size_t token = (size_t)b * STEPS + t;
        const size_t at = token * NH + head;
        const size_t q_at = token * Q_STRIDE + Q_OFF + head * DQK;
        const size_t k_at = token * K_STRIDE + K_OFF + head * DQK;
        const float lf = log_f[at];
        const float ig = i[at];
        const float v_d = live ? float(v[token * V_STRIDE + V_OFF + head * DV + d]) : 0.0f;
        const float m_new = MAX(lf + m_run, ig);
        const float f_act = EXP(lf + m_run - m_new);
        const float i_act = EXP(ig - m_new);
        float num = 0.0f;
        #pragma unroll
        for (uint j = 0; j < PER_THREAD; ++j) {
            const uint a = y + j * ROWS;
            if (ALL_ROWS || a < DQK) {
                const float k_a = i_act * float(k[k_at + a]);
                const float q_a = scale * float(q[q_at + a]);
                c[j] = f_act * c[j] + k_a * v_d;
                num += q_a * c[j];
            }
        }
        float den = 0.0f;
        for (uint o = 0; o < OWNED; ++o) {
            const uint a = y + (x + 32 * o) * ROWS;
            if (x + 32 * o < PER_THREAD && a < DQK) {
                n_own[o] = f_act * n_own[o] + i_act * float(k[k_at + a]);
                den += scale * float(q[q_at + a]) * n_own[o];
            }
        }
        for (uint lanes = 16; lanes > 0; lanes /= 2) {
            den += SHUFFLE_XOR(den, lanes);
        }
        const uint buf = t % 2;
        num_part[buf][y][x] = num;
        if (x == 0) {
            den_part[buf][y] = den;
        }
        BARRIER;
        if (y == 0 && live) {
            float total = 0.0f;
            float q_n = 0.0f;
            #pragma unroll 4
            for (uint r = 0; r < ROWS; ++r) {
                total += num_part[buf][r][x];
                q_n += den_part[buf][r];
            }
            h[at * DV + d] = total / (MAX(ABS(q_n), EXP(-m_new)) + eps[0]);
        }
        m_run = m_new;
    }

    #pragma unroll
    for (uint j = 0; j < PER_THREAD; ++j) {
        const uint a = y + j * ROWS;
        if (live && (ALL_ROWS || a < DQK)) {
            C_out[((size_t)bh * DQK + a) * DV + d] = c[j];
        }
    }
    for (uint o = 0; o < OWNED; ++o) {
        const uint a = y + (x + 32 * o) * ROWS;
        if (d < 32 && x + 32 * o < PER_THREAD && a < DQK) {  // the threadgroup of columns 0-31
            n_out[bh * DQK + a] = n_own[o];
        }
    }
    if (d == 0 && y == 0) {
        m_out[bh] = m_run;
    }
"""


def source(backend: dict) -> str:
    """The kernel body for one backend (`spelling.METAL` or `spelling.CUDA`)."""
    return spell(_BODY.replace("ROWS", str(ROWS)), backend)


NAME = "mlstm_step"
INPUTS = ["q", "k", "v", "i", "log_f", "C", "n", "m", "eps"]
OUTPUTS = ["h", "C_out", "n_out", "m_out"]
# Sizes passed at launch, not compiled in: one binary whatever they are.
RUNTIME = ["STEPS"]
# CUDA: at most 64 registers a thread, so that two threadgroups share an SM (see above).
LAUNCH_BOUNDS = (32 * ROWS, 2)

# The kernel built for this machine; `kernel` is what runs (tests stand another one in).
BUILT = kernel = gpu.build(NAME, INPUTS, OUTPUTS, source, RUNTIME, launch_bounds=LAUNCH_BOUNDS)


def launch(kernel, q, k, v, i, log_f, C, n, m, eps, packed=None, verbose=False):
    """Run `kernel` (built from this module's source) on T tokens; shapes as in
    `mlx_lm_xlstm.mlstm.mlstm_step_ops`. packed: None, or (qkv, (q_off, k_off, v_off)) with
    q, k and v those columns of qkv (B * T rows), which the kernel reads in their place.
    Returns h (B, T, H, Dv) fp32 and the new (C, n, m)."""
    B, H, Dqk, Dv = C.shape
    T = i.shape[1]
    f32 = mx.float32
    columns = -(-Dv // 32) * 32
    if packed is None:
        sources, strides, offsets = [q, k, v], (H * Dqk, H * Dqk, H * Dv), (0, 0, 0)
    else:
        qkv, offsets = packed
        sources, strides = [qkv] * 3, (qkv.shape[-1],) * 3
    h, C, n, m = kernel(
        inputs=[*sources, i.astype(f32), log_f.astype(f32), C, n, m, mx.array([eps], f32)],
        template=[
            ("DQK", Dqk), ("DV", Dv), ("NH", H), ("STEPS", T),
            *zip(("Q_STRIDE", "K_STRIDE", "V_STRIDE"), strides), *zip(("Q_OFF", "K_OFF", "V_OFF"), offsets),
        ],
        grid=(columns, ROWS, B * H),
        threadgroup=(32, ROWS, 1),
        output_shapes=[(B, T, H, Dv), C.shape, n.shape, m.shape],
        output_dtypes=[f32] * 4,
        verbose=verbose,
    )
    return h, (C, n, m)
