"""The projections of a few tokens (decode steps, speculative verify calls): y = x @ w.T for
x (M, K) and a bf16 weight w (N, K), M small (`large.Linear`). One kernel for Metal and one
for CUDA, same algorithm.

A decode step reads every weight once, so its pace is the memory's. MLX's CUDA gemv loads 8
bytes a thread with one load in flight, and half-fills the H200 at N = 4,096 rows: a 7B
pass of it ran at ~3 TB/s of the 4.8 the memory gives. For M > 1 MLX takes cuBLASLt, whose
capture into MLX's CUDA graph costs host time every call (~2 ms a decode step at batch 16).

Work split: a simdgroup / warp per ROWS weight rows; lane l reads 16 bytes (eight bf16) at
k = 8l, 8l + 256, ..., U loads of each row issued before their products, unpacks them once
and multiplies them by each token's eight inputs (fp32 sums); the lanes meet by shuffles.
A token's result does not depend on M (same order of sums): a batch of one and a batch of
sixteen round alike. Rows or tokens that are not 16-byte aligned (K % 8, a view at an odd
offset) take the same loop one element a lane. The products run on the CUDA cores: about
17 instructions a token for each 16 bytes of weights, so beyond a few tokens the
arithmetic, not the memory, sets the pace (`MAX_TOKENS`).
"""

import mlx.core as mx

from . import gpu
from .spelling import spell

def _unpack8(floats: str, word: str) -> str:
    """Body lines that set floats[0..7] to the eight bf16 of the uint4 `word`, in order."""
    halves = "".join(
        f" {floats}[{2 * j}] = AS_FLOAT(b.{c} << 16); {floats}[{2 * j + 1}] = AS_FLOAT(b.{c} & 0xffff0000u);"
        for j, c in enumerate("xyzw")
    )
    return f"{{ const uint4 b = {word};{halves} }}"


_BODY = """
    const uint lane = TID_X % 32;
    const uint row0 = (GID_X / 32) * ROWS;
    if (row0 >= N) {
        return;  // the whole warp: no shuffle waits for it
    }
    float acc[ROWS][MT];
    #pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        #pragma unroll
        for (int t = 0; t < MT; ++t) {
            acc[r][t] = 0.0f;
        }
    }
    if (K % 8 == 0 && ADDRESS(x) % 16 == 0 && ADDRESS(w) % 16 == 0) {
        const int KV = K / 8;
        DEVICE const uint4* wv = (DEVICE const uint4*)w;
        DEVICE const uint4* xv = (DEVICE const uint4*)x;
        for (int kv = lane; kv < KV; kv += 32 * U) {
            uint4 wb[ROWS][U];
            #pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                #pragma unroll
                for (int u = 0; u < U; ++u) {
                    const int at = kv + 32 * u;
                    wb[r][u] = (at < KV && row0 + r < N) ? wv[(size_t)(row0 + r) * KV + at] : ZERO4;
                }
            }
            #pragma unroll
            for (int u = 0; u < U; ++u) {
                if (kv + 32 * u >= KV) {
                    break;
                }
                // a bf16 is the upper half of an fp32: two of them in each word, unpacked
                // once for every token
                float wf[ROWS][8];
                #pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    """ + _unpack8("wf[r]", "wb[r][u]") + """
                }
                #pragma unroll
                for (int t = 0; t < MT; ++t) {
                    if (t < M) {
                        float xf[8];
                        """ + _unpack8("xf", "xv[(size_t)t * KV + kv + 32 * u]") + """
                        #pragma unroll
                        for (int r = 0; r < ROWS; ++r) {
                            float s = acc[r][t];
                            #pragma unroll
                            for (int j = 0; j < 8; ++j) {
                                s += wf[r][j] * xf[j];
                            }
                            acc[r][t] = s;
                        }
                    }
                }
            }
        }
    } else {
        for (int k = lane; k < K; k += 32) {
            #pragma unroll
            for (int t = 0; t < MT; ++t) {
                if (t < M) {
                    const float xk = float(x[(size_t)t * K + k]);
                    #pragma unroll
                    for (int r = 0; r < ROWS; ++r) {
                        if (row0 + r < N) {
                            acc[r][t] += float(w[(size_t)(row0 + r) * K + k]) * xk;
                        }
                    }
                }
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        #pragma unroll
        for (int t = 0; t < MT; ++t) {
            float s = acc[r][t];
            for (uint lanes = 16; lanes > 0; lanes /= 2) {
                s += SHUFFLE_XOR(s, lanes);
            }
            if (lane == 0 && t < M && row0 + r < N) {
                out[(size_t)t * N + row0 + r] = static_cast<T>(s);
            }
        }
    }
"""


def source(backend: dict) -> str:
    """The kernel body for one backend (`spelling.METAL` or `spelling.CUDA`)."""
    return spell(_BODY, backend)


NAME = "xlstm_matvec"
INPUTS = ["x", "w"]
OUTPUTS = ["out"]
# Sizes passed at launch, not compiled in: one binary a token tile, whatever the layer.
RUNTIME = ["M", "K", "N"]
# The most tokens a call takes (`large.Linear`): batch-16 decode steps, verify calls of up
# to 15 drafts. More are a prompt, where a GEMM pays.
MAX_TOKENS = 16
# (token tile MT, rows a warp, loads of a row in flight) by tile: more tokens, more sums
# a load; a second row shares each token's inputs.
PLANS = {1: (1, 1, 4), 2: (2, 1, 4), 4: (4, 2, 2), 8: (8, 2, 2), 16: (16, 2, 1)}
WARPS = 8  # a threadgroup

# The kernel built for this machine; `kernel` is what runs (tests stand another one in).
BUILT = kernel = gpu.build(NAME, INPUTS, OUTPUTS, source, RUNTIME)


def plan(M: int) -> tuple:
    """(MT, ROWS, U) for a call of M tokens: the smallest tile that holds them."""
    return PLANS[next(t for t in sorted(PLANS) if t >= M)]


def launch(kernel, x, w, verbose=False):
    """Run `kernel` (built from this module's source): x (..., K), w (N, K) -> x @ w.T (..., N)."""
    N, K = w.shape
    M = x.size // K
    MT, rows, loads = plan(M)
    warps = -(-N // rows)
    out = kernel(
        inputs=[x, w],
        template=[("T", x.dtype), ("MT", MT), ("ROWS", rows), ("U", loads), ("M", M), ("K", K), ("N", N)],
        grid=(32 * WARPS * -(-warps // WARPS), 1, 1),
        threadgroup=(32 * WARPS, 1, 1),
        output_shapes=[(*x.shape[:-1], N)],
        output_dtypes=[x.dtype],
        verbose=verbose,
    )
    return out[0]
