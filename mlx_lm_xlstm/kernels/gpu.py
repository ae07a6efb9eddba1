"""A kernel body built for this machine's GPU: Metal (`metal.py`) or CUDA (`cuda.py`), or none."""

import mlx.core as mx

from . import cuda, metal
from .spelling import CUDA, METAL


def build(name: str, input_names, output_names, source, runtime=(), launch_bounds=None):
    """`source(spelling)`'s kernel with these parameter names for the GPU here, its `runtime`
    sizes passed at launch; None without a GPU. launch_bounds (threads a threadgroup,
    threadgroups an SM): CUDA only."""
    if mx.metal.is_available():
        return metal.Kernel(name, input_names, output_names, source(METAL), runtime=runtime)
    if mx.cuda.is_available():
        return cuda.Kernel(name, input_names, output_names, source(CUDA), runtime=runtime, launch_bounds=launch_bounds)
    return None
