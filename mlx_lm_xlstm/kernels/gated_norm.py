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


# MLX's CUDA backend hashes the whole binary at every launch (~0.5 us a KB): loops whose unrolling only adds code stay rolled.
_BODY = (
    """
    const uint row = GID_X / TPB;
    const uint token = row / NH;
    const uint head = row % NH;
    const uint tid = TID_X;
    constexpr uint PER = (DV + TPB - 1) / TPB;
    constexpr bool ALL = DV % TPB == 0;  // every thread's every c = tid + j * TPB is < DV
    SHARED float partial[TPB / 32];

    // h, and the gate's o, the weight (and the bias) of the same values, all loaded at once
    float x[PER];
    float o[PER];
    float wt[PER];
    float bs[PER];
    float sum = 0.0f;
    #pragma unroll
    for (uint j = 0; j < PER; ++j) {
        const uint c = tid + j * TPB;
        const uint ch = head * DV + c;
        const bool in = ALL || c < DV;
        x[j] = in ? h[(size_t)row * DV + c] : 0.0f;
        o[j] = in ? float(qkvo[(size_t)token * E + O_START + ch]) : 0.0f;
        wt[j] = in ? float(weight[ch]) : 0.0f;
        bs[j] = (HAS_BIAS && in) ? float(bias[ch]) : 0.0f;
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
        x[j] = (ALL || c < DV) ? x[j] - mean : 0.0f;
        squares += x[j] * x[j];
    }
"""
    + _threadgroup_sum("squares", "var")
    + """
    const float inv_std = RSQRT(var / DV + eps[0]);

    // Not unrolled (one copy of the exp, the division and the rounding): each pass takes the
    // values at [0] and moves the next ones down, so the arrays stay in registers.
    #pragma unroll 1
    for (uint j = 0; j < PER; ++j) {
        const uint c = tid + j * TPB;
        if (ALL || c < DV) {
            float y = x[0] * inv_std * wt[0];
            if (HAS_BIAS) {
                y += bs[0];
            }
            out[(size_t)token * (NH * DV) + head * DV + c] = static_cast<T>(y / (1.0f + EXP(-o[0])));
        }
        #pragma unroll
        for (uint s = 0; s + 1 < PER; ++s) {
            x[s] = x[s + 1];
            o[s] = o[s + 1];
            wt[s] = wt[s + 1];
            bs[s] = bs[s + 1];
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
# CUDA: at most 32 registers a thread (o, weight and bias held from the start took 38), so
# that 16 threadgroups of 128 fill an SM's 2048 threads.
LAUNCH_BOUNDS = (128, 16)

# The kernel built for this machine; `kernel` is what runs (tests stand another one in).
BUILT = kernel = gpu.build(NAME, INPUTS, OUTPUTS, source, RUNTIME, launch_bounds=LAUNCH_BOUNDS)


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
