"""One kernel body, two backends: the names each kernel body uses, spelled for Metal and for CUDA."""

import re

METAL = {
    "GID_X": "thread_position_in_grid.x",
    "GID_Y": "thread_position_in_grid.y",
    "GID_Z": "thread_position_in_grid.z",
    "TID_X": "thread_position_in_threadgroup.x",
    "TID_Y": "thread_position_in_threadgroup.y",
    "MAX": "metal::max",
    "ABS": "metal::abs",
    "EXP": "metal::exp",
    "LOG": "metal::precise::log",
    "TANH": "metal::precise::tanh",
    "RSQRT": "metal::rsqrt",
    "SHUFFLE_XOR": "simd_shuffle_xor",
    "SHARED": "threadgroup",
    "BARRIER": "threadgroup_barrier(mem_flags::mem_threadgroup)",
    "size_t": "ulong",
}
CUDA = {
    "GID_X": "(blockIdx.x * blockDim.x + threadIdx.x)",
    "GID_Y": "(blockIdx.y * blockDim.y + threadIdx.y)",
    "GID_Z": "(blockIdx.z * blockDim.z + threadIdx.z)",
    "TID_X": "threadIdx.x",
    "TID_Y": "threadIdx.y",
    "MAX": "fmaxf",
    "ABS": "fabsf",
    "EXP": "expf",
    "LOG": "logf",
    "TANH": "tanhf",
    "RSQRT": "rsqrtf",
    "SHUFFLE_XOR": "shuffle_xor",  # kernels/cuda.py's PRELUDE: a whole warp's __shfl_xor_sync
    "SHARED": "__shared__",
    "BARRIER": "__syncthreads()",
    # NVRTC compiles without the host's headers: spell the integer types out.
    "uint": "unsigned int",
    "size_t": "unsigned long long",
}


def spell(body: str, backend: dict) -> str:
    """`body` with each of `backend`'s names (whole words) replaced by its spelling."""
    return re.sub(r"\b(" + "|".join(backend) + r")\b", lambda w: backend[w.group(0)], body)
