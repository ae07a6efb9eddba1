"""CUDA kernels compiled once per machine, not once per process.

`mx.fast.cuda_kernel` compiles its source with MLX's device headers in every new process
(about 1.8 s a kernel and a shape on an H200) and keeps nothing on disk: each `mlx_lm
generate`, chat or server start paid that for every kernel, and again for every new prompt
length (the chunk count was a compile-time constant). Here a kernel body becomes a small
translation unit of its own, which needs no header (bf16/fp16 loads and stores are spelled
out below), compiled by NVRTC (the library MLX's CUDA backend itself links) and kept under
MLX_XLSTM_CACHE_DIR (default ~/.cache/mlx_lm_xlstm), keyed by the source, the GPU's
architecture and the MLX version. Sizes that vary from call to call (`runtime`) are launch
arguments instead of constants. The binary runs through `mx.fast.precompiled_cuda_kernel`.

`Kernel` is called as the kernels `mx.fast.cuda_kernel` makes (inputs=, template=, grid=,
threadgroup=, output_shapes=, output_dtypes=), so one `launch` serves both backends.
"""

import ctypes
import hashlib
import os
from pathlib import Path

import mlx.core as mx

# The types a kernel body sees for bf16/fp16 arrays: 16-bit storage that converts to and from
# float exactly as the hardware does (round to nearest even; NaN stays NaN).
PRELUDE = r"""
union f32_bits { float f; unsigned int u; };
struct bfloat16_t {
    unsigned short bits;
    bfloat16_t() = default;
    __device__ bfloat16_t(float x) {
        f32_bits b; b.f = x;
        bits = (b.u & 0x7fffffffu) > 0x7f800000u ? (unsigned short)((b.u >> 16) | 0x40u)
                                                  : (unsigned short)((b.u + 0x7fffu + ((b.u >> 16) & 1u)) >> 16);
    }
    __device__ operator float() const { f32_bits b; b.u = ((unsigned int)bits) << 16; return b.f; }
};
struct float16_t {
    unsigned short bits;
    float16_t() = default;
    __device__ float16_t(float x) { asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(x)); }
    __device__ operator float() const { float x; asm("cvt.f32.f16 %0, %1;" : "=f"(x) : "h"(bits)); return x; }
};
__device__ inline float shuffle_xor(float x, unsigned int lanes) { return __shfl_xor_sync(0xffffffffu, x, lanes); }
"""
TYPES = {mx.float32: "float", mx.bfloat16: "bfloat16_t", mx.float16: "float16_t"}


def cache_dir() -> Path:
    root = os.environ.get("MLX_XLSTM_CACHE_DIR") or Path.home() / ".cache" / "mlx_lm_xlstm"
    return Path(root) / f"mlx-{mx.__version__}"


def device_signature() -> str:
    """The GPU (name, architecture, compute capability) as keys of what is kept on disk say it."""
    info = mx.device_info()
    return "|".join(str(info.get(k)) for k in ("device_name", "architecture", "compute_capability_major", "compute_capability_minor"))


def _architecture():
    info = mx.device_info()
    return int(info["compute_capability_major"]), int(info["compute_capability_minor"])


class NVRTC:
    """The few NVRTC calls a compile needs, through ctypes."""

    def __init__(self):
        self.lib = _load_nvrtc()
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def _check(self, result, what):
        if result:
            raise RuntimeError(f"NVRTC {what}: {self.lib.nvrtcGetErrorString(result).decode()}")

    def compile(self, source: str, name: str, arch: str, binary: bool) -> bytes:
        """`source` compiled for `arch` (sm_XY: a cubin; compute_XY: PTX)."""
        lib, prog = self.lib, ctypes.c_void_p()
        self._check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None, None), "create")
        try:
            options = [f"--gpu-architecture={arch}".encode()]
            result = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
            if result:
                size = ctypes.c_size_t()
                lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
                log = ctypes.create_string_buffer(size.value)
                lib.nvrtcGetProgramLog(prog, log)
                raise RuntimeError(f"NVRTC could not compile {name} for {arch}:\n{log.value.decode(errors='replace')}")
            get_size, get = (lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN) if binary else (lib.nvrtcGetPTXSize, lib.nvrtcGetPTX)
            size = ctypes.c_size_t()
            self._check(get_size(prog, ctypes.byref(size)), "size")
            out = ctypes.create_string_buffer(size.value)
            self._check(get(prog, out), "output")
            return out.raw
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _load_nvrtc():
    """MLX's CUDA backend links libnvrtc, so it is loaded already; else look where pip puts it."""
    names = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    try:
        import nvidia

        for base in nvidia.__path__:
            names += sorted(str(p) for p in Path(base).glob("*/lib/libnvrtc.so*") if "builtins" not in p.name)
    except ImportError:
        pass
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise RuntimeError("libnvrtc not found")


_nvrtc = None


def compiled(source: str, name: str) -> bytes:
    """The binary of `source` for this GPU: from the disk cache, or compiled and cached."""
    global _nvrtc
    major, minor = _architecture()
    key = hashlib.sha256(f"{source}|{major}{minor}".encode()).hexdigest()[:20]
    path = cache_dir() / f"sm_{major}{minor}" / f"{name}-{key}.bin"
    try:
        return path.read_bytes()
    except OSError:
        pass
    _nvrtc = _nvrtc or NVRTC()
    try:
        binary = _nvrtc.compile(source, name, f"sm_{major}{minor}", binary=True)
    except RuntimeError:  # an NVRTC older than the GPU: PTX, which the driver finishes
        binary = _nvrtc.compile(source, name, f"compute_{major}{minor}", binary=False) + b"\0"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(binary)
        os.replace(tmp, path)
    except OSError:  # a read-only home: compile again next time
        pass
    return binary


class Kernel:
    """A kernel body (CUDA spelling) with its parameter names; `runtime` names template
    integers that are passed at launch instead of compiled in; `launch_bounds` (threads a
    threadgroup, threadgroups an SM) caps the registers a thread so that that many fit."""

    def __init__(self, name: str, input_names, output_names, body: str, runtime=(), launch_bounds=None):
        self.name, self.body, self.runtime = name, body, tuple(runtime)
        self.bounds = "__launch_bounds__({}, {}) ".format(*launch_bounds) if launch_bounds else ""
        self.input_names, self.output_names = list(input_names), list(output_names)
        self._binaries = {}

    def source(self, input_dtypes, output_dtypes, constants) -> tuple:
        """(symbol, translation unit) for these dtypes and compile-time constants."""
        params = [f"const {TYPES[d]}* {n}" for n, d in zip(self.input_names, input_dtypes)]
        params += [f"{TYPES[d]}* {n}" for n, d in zip(self.output_names, output_dtypes)]
        params += [f"const int {n}" for n in self.runtime]
        lines = [f"using {n} = {TYPES[v]};" if isinstance(v, mx.Dtype) else f"constexpr int {n} = {int(v)};" for n, v in constants]
        tag = "_".join(TYPES[d] for d in (*input_dtypes, *output_dtypes)) + "".join(f"_{v}" for _, v in constants)
        symbol = f"{self.name}_{hashlib.sha256(tag.encode()).hexdigest()[:12]}"
        unit = (
            PRELUDE + f'extern "C" __global__ void {self.bounds}{symbol}(\n    ' + ",\n    ".join(params) + ") {\n"
            + "".join(f"    {l}\n" for l in lines) + self.body + "\n}\n"
        )
        return symbol, unit

    def __call__(self, *, inputs, template, grid, threadgroup, output_shapes, output_dtypes, verbose=False):
        constants = [(n, v) for n, v in template if n not in self.runtime]
        scalars = [int(dict(template)[n]) for n in self.runtime]
        key = (tuple(x.dtype for x in inputs), tuple(output_dtypes), tuple(constants))
        if key not in self._binaries:
            symbol, unit = self.source(*key)
            if verbose:
                print(unit)
            self._binaries[key] = (symbol, compiled(unit, symbol))
        symbol, binary = self._binaries[key]
        return mx.fast.precompiled_cuda_kernel(
            name=symbol, compiled_source=binary, inputs=inputs, output_shapes=output_shapes,
            output_dtypes=output_dtypes, scalars=scalars, grid=grid, threadgroup=threadgroup,
            ensure_row_contiguous=True,
        )
