"""A residual add and the RMSNorm after it (`mlx_lm_xlstm.large.add_rms_norm_ops`): the sum,
rounded to the model's dtype, and its RMSNorm with weight, in one launch. One kernel for
Metal and one for CUDA, same algorithm.

In an xLSTM-7b block the mLSTM layer's output joins the residual stream and the FFN's norm
reads the sum: with ops an add launch and an RMSNorm launch, the sum through memory
between them. In a decode step every launch costs some microseconds of GPU time and of
host time, whatever its size.

Work split: one threadgroup of TPB threads per token (row); each thread keeps D / TPB of
the row's sums in registers; their squares meet by lane shuffles within each simdgroup /
warp, then in threadgroup memory (`gated_norm.threadgroup_sum`).
"""

import mlx.core as mx

from . import cuda
from .gated_norm import threadgroup_sum
from .spelling import CUDA, METAL, spell

_BODY = (
    """
    const uint row = GID_X / TPB;
    const uint tid = TID_X;
    constexpr uint PER = (D + TPB - 1) / TPB;
    SHARED float partial[TPB / 32];

    float s[PER];
    float squares = 0.0f;
    #pragma unroll
    for (uint j = 0; j < PER; ++j) {
        const uint c = tid + j * TPB;
        if (c < D) {
            // the sum as the model's dtype holds it: the stream carries it on
            const T sum = static_cast<T>(float(x[(size_t)row * D + c]) + float(y[(size_t)row * D + c]));
            sum_out[(size_t)row * D + c] = sum;
            s[j] = float(sum);
        } else {
            s[j] = 0.0f;
        }
        squares += s[j] * s[j];
    }
"""
    + threadgroup_sum("squares", "total")
    + """
    const float inv_rms = RSQRT(total / D + eps[0]);
    #pragma unroll
    for (uint j = 0; j < PER; ++j) {
        const uint c = tid + j * TPB;
        if (c < D) {
            norm_out[(size_t)row * D + c] = static_cast<T>(s[j] * inv_rms * float(weight[c]));
        }
    }
"""
)


def source(backend: dict) -> str:
    """The kernel body for one backend (`spelling.METAL` or `spelling.CUDA`)."""
    return spell(_BODY, backend)


INPUTS = ["x", "y", "weight", "eps"]
OUTPUTS = ["sum_out", "norm_out"]


def _build():
    if mx.metal.is_available():
        return mx.fast.metal_kernel("residual_add_rms_norm", INPUTS, OUTPUTS, source(METAL))
    if mx.cuda.is_available():
        return cuda.Kernel("residual_add_rms_norm", INPUTS, OUTPUTS, source(CUDA))
    return None


# The kernel built for this machine; `kernel` is what runs (tests stand another one in).
BUILT = kernel = _build()


def threads(D: int) -> int:
    """Threads per row: whole simdgroups, at most 256 (16 values a thread at the 7B's 4096)."""
    return min(256, -(-D // 32) * 32)


def launch(kernel, x, y, weight, eps, verbose=False):
    """Run `kernel` (built from this module's source); arguments and results as
    `mlx_lm_xlstm.large.add_rms_norm_ops`: x, y (..., D) of one dtype, weight (D,)."""
    D = x.shape[-1]
    tpb = threads(D)
    sum_out, norm_out = kernel(
        inputs=[x, y, weight, mx.array([eps], mx.float32)],
        template=[("T", x.dtype), ("D", D), ("TPB", tpb)],
        grid=(tpb * (x.size // D), 1, 1),  # rows along x: a grid's y and z stop at 65,535 on CUDA
        threadgroup=(tpb, 1, 1),
        output_shapes=[x.shape, x.shape],
        output_dtypes=[x.dtype, x.dtype],
        verbose=verbose,
    )
    return sum_out, norm_out
