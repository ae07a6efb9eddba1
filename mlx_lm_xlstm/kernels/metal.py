"""Metal kernels whose varying sizes are read at launch, not compiled in.

`mx.fast.metal_kernel` builds a library for each new set of template values, on first use in
every process: with the chunk count of a prompt piece and the token count of a call as
template constants, a new prompt length or speculative verify length built another one
before its first token. Sizes named `runtime` are passed in one small int32 array instead
(`runtime_sizes`, read into constants of the same names at the top of the body), so one
library serves every length, as `cuda.Kernel`'s launch arguments do on CUDA.

`Kernel` is called as the kernels `mx.fast.metal_kernel` makes, so one `launch` serves
both backends.
"""

import mlx.core as mx

SIZES = "runtime_sizes"


class Kernel:
    """A kernel body (Metal spelling) with its parameter names; `runtime` names template
    integers that are passed at launch instead of compiled in."""

    def __init__(self, name: str, input_names, output_names, body: str, runtime=()):
        self.runtime = tuple(runtime)
        reads = "".join(f"    const int {n} = {SIZES}[{j}];\n" for j, n in enumerate(self.runtime))
        inputs = [*input_names, SIZES] if self.runtime else list(input_names)
        self.kernel = mx.fast.metal_kernel(name, inputs, list(output_names), reads + body)

    def __call__(self, *, inputs, template, grid, threadgroup, output_shapes, output_dtypes, verbose=False):
        values = dict(template)
        if self.runtime:
            inputs = [*inputs, mx.array([int(values[n]) for n in self.runtime], mx.int32)]
        return self.kernel(
            inputs=inputs, template=[(n, v) for n, v in template if n not in self.runtime], grid=grid,
            threadgroup=threadgroup, output_shapes=output_shapes, output_dtypes=output_dtypes, verbose=verbose,
        )
