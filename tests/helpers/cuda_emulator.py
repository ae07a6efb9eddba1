"""The CUDA kernels run on the CPU: the translation unit `kernels.cuda.Kernel` compiles on a GPU,
its prelude (the GPU's bf16/fp16 types and warp shuffle) swapped for tests/cuda_emulator.h,
built by g++ and called through ctypes. `EmulatedKernel` is called as `cuda.Kernel` is, so a
kernel module's `launch`, and its first-use check, run it unchanged."""

import ctypes
import hashlib
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_lm_xlstm.kernels import cuda

HEADER = Path(__file__).resolve().parent.parent / "cuda_emulator.h"
BUILD = Path(tempfile.gettempdir()) / "mlx_lm_xlstm_cuda_emulator"
# bf16 crosses into numpy as its bits
NUMPY = {mx.float32: np.float32, mx.bfloat16: np.uint16, mx.float16: np.float16}
GUARD = 65536  # bytes either side of each output


def _to_numpy(x: mx.array) -> np.ndarray:
    x = mx.contiguous(x)
    return np.ascontiguousarray(np.array(x.view(mx.uint16) if x.dtype == mx.bfloat16 else x))


def _from_numpy(a: np.ndarray, dtype) -> mx.array:
    return mx.array(a).view(mx.bfloat16) if dtype == mx.bfloat16 else mx.array(a)


class EmulatedKernel:
    """`kernel` (a cuda.Kernel) run by CPU threads, one per GPU thread."""

    def __init__(self, kernel: cuda.Kernel):
        self.kernel = kernel
        self._launches = {}

    @property
    def body(self) -> str:
        return self.kernel.body

    def __call__(self, *, inputs, template, grid, threadgroup, output_shapes, output_dtypes, verbose=False):
        runtime = self.kernel.runtime
        constants = tuple((n, v) for n, v in template if n not in runtime)
        key = (tuple(x.dtype for x in inputs), tuple(output_dtypes), constants)
        if key not in self._launches:
            self._launches[key] = self._build(*key)
        ins = [_to_numpy(x) for x in inputs]
        # each output between guard bytes: a write out of bounds fails here, not later in the heap
        padded = [np.full(int(np.prod(shape)) * np.dtype(NUMPY[d]).itemsize + 2 * GUARD, 0xA5, np.uint8) for shape, d in zip(output_shapes, output_dtypes)]
        outs = [p[GUARD:-GUARD].view(NUMPY[d]).reshape(shape) for p, shape, d in zip(padded, output_shapes, output_dtypes)]
        for o in outs:
            o[...] = 0
        buffers = (ctypes.c_void_p * len(ins + outs))(*[a.ctypes.data for a in ins + outs])
        scalars = [int(dict(template)[n]) for n in runtime]
        ints = (ctypes.c_int * max(1, len(scalars)))(*scalars)
        blocks = [-(-g // t) for g, t in zip(grid, threadgroup)]
        self._launches[key](buffers, ints, *blocks, *threadgroup)
        for j, p in enumerate(padded):
            if (p[:GUARD] != 0xA5).any() or (p[-GUARD:] != 0xA5).any():
                raise AssertionError(f"the emulated {self.kernel.name} wrote outside output {j} ({self.kernel.output_names[j]})")
        return [_from_numpy(np.array(a), d) for a, d in zip(outs, output_dtypes)]

    def _build(self, input_dtypes, output_dtypes, constants):
        symbol, unit = self.kernel.source(input_dtypes, output_dtypes, constants)
        assert unit.startswith(cuda.PRELUDE)
        types = [cuda.TYPES[d] for d in (*input_dtypes, *output_dtypes)]
        args = [f"({'const ' if j < len(input_dtypes) else ''}{t}*)buffers[{j}]" for j, t in enumerate(types)]
        args += [f"ints[{j}]" for j in range(len(self.kernel.runtime))]
        source = (
            f'#include "{HEADER}"\n' + unit[len(cuda.PRELUDE):]
            + 'extern "C" void launch(void** buffers, const int* ints, unsigned gx, unsigned gy, unsigned gz,'
            + " unsigned bx, unsigned by, unsigned bz) {\n"
            + f"    emulated_launch({{gx, gy, gz}}, {{bx, by, bz}}, [&] {{ {symbol}({', '.join(args)}); }});\n}}\n"
        )
        digest = hashlib.sha256((source + HEADER.read_text()).encode()).hexdigest()[:20]
        library = BUILD / f"{symbol}-{digest}.so"
        if not library.exists():
            BUILD.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=BUILD) as tmp:
                path = Path(tmp) / "unit.cpp"
                path.write_text(source)
                built = Path(tmp) / "unit.so"
                result = subprocess.run(
                    ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", str(path), "-o", str(built)],
                    capture_output=True, text=True,
                )
                if result.returncode:
                    raise RuntimeError(f"g++ could not build the emulated {symbol}:\n{result.stderr}")
                built.replace(library)
        launch = ctypes.CDLL(str(library)).launch
        launch.restype = None
        launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_uint] * 6
        return launch


def emulated(module, body=None) -> EmulatedKernel:
    """The CPU run of a kernel module's CUDA kernel (kernels/step.py, chunk_states.py, ...), as
    `kernels.gpu.build` makes it on a GPU; `body`: another body in its place."""
    from mlx_lm_xlstm.kernels.spelling import CUDA

    body = module.source(CUDA) if body is None else body
    return EmulatedKernel(cuda.Kernel(module.NAME, module.INPUTS, module.OUTPUTS, body, runtime=module.RUNTIME))
