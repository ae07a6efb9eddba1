"""Chunk-state recurrence of the chunkwise prefill (`mlx_lm_xlstm.mlstm.chunk_states_ops`), one
kernel for Metal and one for CUDA, same algorithm.

The chunkwise form is two parts (as in NX-AI's TFLA): matmuls inside each chunk, which
MLX's GEMMs do on tensor cores, and the recurrence that carries the state from chunk to
chunk. Written with ops, that recurrence is a weighted sum over all chunks, which moves
each chunk's (Dqk, Dv) contribution through memory several times (concatenate, matmul,
slice, cast). The kernel reads each contribution once and writes each entering state once.

Work split: one thread per element of a head's [C | n] (Dqk * Dv + Dqk values), one grid
row per (sequence, head); each thread walks the chunks in order, loading AHEAD of them at a time. The stabiliser is a
scalar recurrence that every thread recomputes (two loads per chunk, shared by the whole
head, so cached). Consecutive threads touch consecutive elements: coalesced.
The chunk count NC is a launch argument (one binary for every prompt length).
"""

import mlx.core as mx

from . import gpu
from .spelling import spell

THREADS = 256
# Chunks whose loads a thread issues together before walking them (H200, 7B shape, a
# 2,048-token piece: a chunk at a time, each load waited for in turn, took 119 us a layer).
AHEAD = 8

# MLX's CUDA backend hashes the whole binary at every launch (~0.5 us a KB): loops whose unrolling only adds code stay rolled.
_BODY = """
    const uint e = GID_X;
    const uint bh = GID_Y;
    const uint CSIZE = DQK * DV;
    if (e >= CSIZE + DQK) {
        return;
    }
    const bool in_C = e < CSIZE;
    const size_t stride = in_C ? CSIZE : DQK;
    const size_t at = in_C ? e : e - CSIZE;
    const size_t base = (size_t)bh * NC * stride + at;

    float m_run = m[bh];
    float s = in_C ? C[(size_t)bh * CSIZE + at] : n[(size_t)bh * DQK + at];
    // The contributions and gates of AHEAD chunks loaded together, then walked in order:
    // their loads are in flight at once (the walk is the same arithmetic, chunk by chunk).
    #pragma unroll 1
    for (uint c0 = 0; c0 < NC; c0 += AHEAD) {
        float d[AHEAD];
        float g_c[AHEAD];
        float a_c[AHEAD];
        #pragma unroll
        for (uint j = 0; j < AHEAD; ++j) {
            const uint c = c0 + j;
            const size_t here = base + (size_t)c * stride;
            d[j] = c >= NC ? 0.0f : in_C ? float(dC[here]) : float(dn[here]);
            g_c[j] = c < NC ? g[bh * NC + c] : 0.0f;
            a_c[j] = c < NC ? a_max[bh * NC + c] : 0.0f;
        }
        #pragma unroll
        for (uint j = 0; j < AHEAD; ++j) {
            const uint c = c0 + j;
            if (c < NC) {
                const size_t here = base + (size_t)c * stride;
                if (in_C) {
                    C_in[here] = static_cast<T>(s);
                } else {
                    n_in[here] = s;
                }
                if (e == 0) {
                    m_in[bh * NC + c] = m_run;
                }
                const float m_next = MAX(g_c[j] + m_run, a_c[j]);
                s = EXP(g_c[j] + m_run - m_next) * s + EXP(a_c[j] - m_next) * d[j];
                m_run = m_next;
            }
        }
    }
    if (in_C) {
        C_out[(size_t)bh * CSIZE + at] = s;
    } else {
        n_out[(size_t)bh * DQK + at] = s;
    }
    if (e == 0) {
        m_out[bh] = m_run;
    }
"""


def source(backend: dict) -> str:
    """The kernel body for one backend (`spelling.METAL` or `spelling.CUDA`)."""
    return spell(_BODY.replace("AHEAD", str(AHEAD)), backend)


NAME = "mlstm_chunk_states"
INPUTS = ["g", "a_max", "dC", "dn", "C", "n", "m"]
OUTPUTS = ["C_in", "n_in", "m_in", "C_out", "n_out", "m_out"]
# Sizes passed at launch, not compiled in: one binary whatever they are.
RUNTIME = ["NC"]

# The kernel built for this machine; `kernel` is what runs (tests stand another one in).
BUILT = kernel = gpu.build(NAME, INPUTS, OUTPUTS, source, RUNTIME)


def launch(kernel, g, a_max, dC, dn, C, n, m, verbose=False):
    """Run `kernel` (built from this module's source); arguments and result as
    `mlx_lm_xlstm.mlstm.chunk_states_ops`."""
    B, H, NC, Dqk, Dv = dC.shape
    f32 = mx.float32
    elements = -(-(Dqk * Dv + Dqk) // THREADS) * THREADS
    C_in, n_in, m_in, C, n, m = kernel(
        inputs=[g.astype(f32), a_max.astype(f32), dC, dn, C, n, m],
        template=[("T", dC.dtype), ("NC", NC), ("DQK", Dqk), ("DV", Dv)],
        grid=(elements, B * H, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[dC.shape, dn.shape, g.shape, C.shape, n.shape, m.shape],
        output_dtypes=[dC.dtype] + [f32] * 5,
        verbose=verbose,
    )
    return (C_in, n_in, m_in), (C, n, m)
