"""xLSTM-7b's gates (`mlx_lm_xlstm.large.head_gates_ops`): the fp32 gate projection of each
token, its bias, the soft cap, and the forget gates' log-sigmoid, in one launch. One kernel
for Metal and one for CUDA, same algorithm.

With ops these are a cast of the tokens to fp32, a matmul, the bias-and-cap launch and the
log-sigmoid launch (the split between them ends a fused run): four launches a layer for
sixteen numbers a token, and a decode step pays for each launch, on the host (MLX encodes
every op) and on the GPU.

Work split: one threadgroup per token (TOK = TOKENS_A_GROUP tokens in a prompt call), one
simdgroup / warp per gate row (input gates, then forget gates: G rows); lane l sums a
token's products at k = l, l + 32, ... in fp32 (exponential gates amplify rounding) and in
that order whatever TOK, the lanes meet by shuffles, and lane 0 finishes the row. A folder
may hold the gate weights in bf16 (mlx_lm.convert keeps them fp32): they are read as fp32,
as the ops path casts them.
"""

import mlx.core as mx

from . import gpu
from .spelling import spell

# MLX's CUDA backend hashes the whole binary at every launch (~0.5 us a KB): loops whose unrolling only adds code stay rolled.
_BODY = """
    const uint row = TID_X / 32;
    const uint lane = TID_X % 32;
    const uint first = GID_X / (32 * G) * TOK;  // this threadgroup's tokens: first, ..., first + TOK - 1
    const size_t w_row = (size_t)row * K;
    float s[TOK];
    #pragma unroll
    for (uint t = 0; t < TOK; ++t) {
        s[t] = 0.0f;
    }
    uint k = lane;
    // four products a pass (their loads in flight together), each token's summed in k order
    #pragma unroll 1
    for (; k + 96 < K; k += 128) {
        const float w0 = float(w[w_row + k]), w1 = float(w[w_row + k + 32]);
        const float w2 = float(w[w_row + k + 64]), w3 = float(w[w_row + k + 96]);
        #pragma unroll
        for (uint t = 0; t < TOK; ++t) {
            if (first + t < M) {
                const size_t x_row = (size_t)(first + t) * K;
                const float x0 = float(x[x_row + k]), x1 = float(x[x_row + k + 32]);
                const float x2 = float(x[x_row + k + 64]), x3 = float(x[x_row + k + 96]);
                s[t] += x0 * w0;
                s[t] += x1 * w1;
                s[t] += x2 * w2;
                s[t] += x3 * w3;
            }
        }
    }
    #pragma unroll 1
    for (; k < K; k += 32) {
        const float w0 = float(w[w_row + k]);
        #pragma unroll
        for (uint t = 0; t < TOK; ++t) {
            if (first + t < M) {
                s[t] += float(x[(size_t)(first + t) * K + k]) * w0;
            }
        }
    }
    #pragma unroll
    for (uint t = 0; t < TOK; ++t) {
        for (uint lanes = 16; lanes > 0; lanes /= 2) {
            s[t] += SHUFFLE_XOR(s[t], lanes);
        }
    }
    if (lane == 0) {
        #pragma unroll
        for (uint t = 0; t < TOK; ++t) {
            const uint token = first + t;
            if (token < M) {
                const float g = cap[0] * TANH((s[t] + float(bias[row])) / cap[0]);
                if (row < G / 2) {
                    i_out[token * (G / 2) + row] = g;
                } else {
                    // log-sigmoid(g) = -(max(-g, 0) + log1p(exp(-|g|))); log1p by log(u) * e / (u - 1),
                    // exact where 1 + e rounds (Metal has no log1p)
                    const float e = EXP(-ABS(g));
                    const float u = 1.0f + e;
                    const float softplus = u == 1.0f ? e : LOG(u) * e / (u - 1.0f);
                    log_f_out[token * (G / 2) + row - G / 2] = -(MAX(-g, 0.0f) + softplus);
                }
            }
        }
    }
"""


def source(backend: dict) -> str:
    """The kernel body for one backend (`spelling.METAL` or `spelling.CUDA`)."""
    return spell(_BODY, backend)


NAME = "xlstm_head_gates"
INPUTS = ["x", "w", "bias", "cap"]
OUTPUTS = ["i_out", "log_f_out"]
# Sizes passed at launch, not compiled in: one binary whatever they are.
RUNTIME = ["K", "M"]
# A call of at least GROUPED_FROM tokens (a prompt) gives each threadgroup TOKENS_A_GROUP of
# them: each warp then reads its gate row's weights once for all of them, where a threadgroup
# a token read all the weights again for every token (2,048 tokens: 106 us a call on an H200,
# most of it reading 256 KiB of weights from L2 per token, and in a prompt the call waits for
# the SMs of the q|k|v|o GEMM beside it). Shorter calls (decode, verify calls) keep one token
# a threadgroup: the lowest latency.
GROUPED_FROM = 64
TOKENS_A_GROUP = 8
# The most gate rows a threadgroup takes (a warp each): 1024 threads.
MAX_ROWS = 32

# The kernel built for this machine; `kernel` is what runs (tests stand another one in).
BUILT = kernel = gpu.build(NAME, INPUTS, OUTPUTS, source, RUNTIME)


def launch(kernel, x, weight, bias, cap, lead=None, verbose=False):
    """Run `kernel` (built from this module's source); arguments and results as
    `mlx_lm_xlstm.large.head_gates_ops`: x (..., K); returns i, log_f (*lead, G / 2) fp32,
    lead x.shape[:-1] unless given (as many tokens)."""
    G, K = weight.shape
    tokens = x.size // K
    lead = x.shape[:-1] if lead is None else tuple(lead)
    per_group = TOKENS_A_GROUP if tokens >= GROUPED_FROM else 1
    i, log_f = kernel(
        inputs=[x, weight, bias, mx.array([cap], mx.float32)],
        template=[("G", G), ("K", K), ("M", tokens), ("TOK", per_group)],
        grid=(32 * G * -(-tokens // per_group), 1, 1),
        threadgroup=(32 * G, 1, 1),
        output_shapes=[(*lead, G // 2)] * 2,
        output_dtypes=[mx.float32] * 2,
        verbose=verbose,
    )
    return i, log_f
