"""The mLSTM layer's output stage (`mlx_lm_xlstm.large.gated_head_norm_ops`): LayerNorm over
each head's values, its weight (and bias), times the output gate sigmoid(o), rounded once to
the model's dtype. One kernel for Metal and one for CUDA, same algorithm.

With ops this is a LayerNorm launch, then a fused multiply-and-gate launch, with h read and
written twice between them; the kernel reads h and o once and writes the result once
(7B shape, H200: 12.5 against 20-22 us a layer at batch 1, one launch in place of two).

Work split: one threadgroup of TPB threads per (token, head), all along the grid's x
(a batch of prompts has more rows than a CUDA grid's y or z takes); each thread keeps
DV / TPB of the head's values in registers; the sums of the mean and of the variance meet
by lane shuffles within each simdgroup / warp, then in threadgroup memory.
o is read in place from the fused q|k|v|o projection's output (its columns from O_START):
a slice of it would be copied first.
"""

import mlx.core as mx

from . import gpu
from .spelling import spell


def _threadgroup_sum(value: str, total: str) -> str:
    """Body lines that set `total` to the sum of every thread's `value`: lane shuffles within
    each simdgroup / warp, then its partial sums in threadgroup memory."""
    return f"""
    for (uint lanes = 16; lanes > 0; lanes /= 2) {{
        {value} += SHUFFLE_XOR({value}, lanes);
    }}
    if (tid % 32 == 0) {{
        partial[tid / 32] = {value};
    }}
    BARRIER;
    float {total} = 0.0f;
    for (uint w = 0; w < TPB / 32; ++w) {{
        {total} += partial[w];
    }}
    BARRIER;
"""


_BODY = (
    """
    const uint row = GID_X / TPB;
    const uint token = row / NH;
    const uint head = row % NH;
    const uint tid = TID_X;
    constexpr uint PER = (DV + TPB - 1) / TPB;
    SHARED float partial[TPB / 32];

    float x[PER];
    float sum = 0.0f;
    #pragma unroll
    for (uint j = 0; j < PER; ++j) {
        const uint c = tid + j * TPB;
        x[j] = c < DV ? h[(size_t)row * DV + c] : 0.0f;
        sum += x[j];
    }
"""
    + _threadgroup_sum("sum", "mean")
    + """
    mean /= DV;
    float squares = 0.0f;
    #pragma unroll
    for (uint j = 0; j < PER; ++j) {
        const uint c = tid + j * TPB;
        x[j] = c < DV ? x[j] - mean : 0.0f;
        squares += x[j] * x[j];
    }
"""
    + _threadgroup_sum("squares", "var")
    + """
    const float inv_std = RSQRT(var / DV + eps[0]);

    #pragma unroll
    for (uint j = 0; j < PER; ++j) {
        const uint c = tid + j * TPB;
        if (c < DV) {
            const uint ch = head * DV + c;
            float y = x[j] * inv_std * float(weight[ch]);
            if (HAS_BIAS) {
                y += float(bias[ch]);
            }
            const float o = float(qkvo[(size_t)token * E + O_START + ch]);
            out[(size_t)token * (NH * DV) + ch] = static_cast<T>(y / (1.0f + EXP(-o)));
        }
    }
"""
)


def source(backend: dict) -> str:
    """The kernel body for one backend (`spelling.METAL` or `spelling.CUDA`)."""
    return spell(_BODY, backend)


NAME = "mlstm_gated_head_norm"
INPUTS = ["h", "qkvo", "weight", "bias", "eps"]
OUTPUTS = ["out"]
# Nothing of it varies from call to call of one model.
RUNTIME = []

# The kernel built for this machine; `kernel` is what runs (tests stand another one in).
BUILT = kernel = gpu.build(NAME, INPUTS, OUTPUTS, source, RUNTIME)


def threads(Dv: int) -> int:
    """Threads per head: whole simdgroups, at most 128 (4 values a thread at the 7B's 512)."""
    return min(128, -(-Dv // 32) * 32)


def launch(kernel, h, qkvo, weight, bias, o_start, eps, verbose=False):
    """Run `kernel` (built from this module's source); arguments and result as
    `mlx_lm_xlstm.large.gated_head_norm_ops`. bias None: no bias."""
    H, Dv = h.shape[-2:]
    tpb = threads(Dv)
    out = kernel(
        inputs=[h, qkvo, weight, weight if bias is None else bias, mx.array([eps], mx.float32)],
        template=[
            ("T", qkvo.dtype), ("NH", H), ("DV", Dv), ("TPB", tpb), ("E", qkvo.shape[-1]),
            ("O_START", o_start), ("HAS_BIAS", int(bias is not None)),
        ],
        grid=(tpb * (h.size // Dv), 1, 1),  # rows along x: a grid's y and z stop at 65,535 on CUDA
        threadgroup=(tpb, 1, 1),
        output_shapes=[(*qkvo.shape[:-1], H * Dv)],
        output_dtypes=[qkvo.dtype],
        verbose=verbose,
    )
    return out[0]
