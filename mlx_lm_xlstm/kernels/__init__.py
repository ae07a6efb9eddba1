"""The mLSTM cell as the model calls it: a fused kernel where one runs, the pure-MLX path otherwise.

`mlstm_step` and `mlstm_chunkwise` take exactly the arguments of `mlx_lm_xlstm.mlstm`.
The decode step uses the fused kernel of `step.py` when
  - a Metal or CUDA kernel was built (a GPU is there) and the default device is the GPU,
  - `MLX_XLSTM_KERNELS` is not "0",
  - the shapes and dtypes are ones the kernel takes (fp32 state, fp32/fp16/bf16 q, k, v),
  - the kernel matched the pure-MLX step on a small random input the first time it was asked for.
The kernel has the pure-MLX step's VJP (`mx.custom_function`), so training through it is exact.
Otherwise, and for prefill, the pure-MLX cell runs under `mx.compile`, which fuses its
elementwise ops (there is no prefill kernel: BENCHMARKS.md says why).
MLX_XLSTM_KERNELS=0 forces the plain, uncompiled pure-MLX path.
"""

import functools
import os
import warnings

import mlx.core as mx

from .. import mlstm as ops
from . import step as _step

__all__ = ["mlstm_step", "mlstm_chunkwise", "kernels_enabled"]

_STATE_DTYPE = mx.float32
_INPUT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
# None: not checked yet; then True/False once the first-use comparison has run.
_verified = {"step": None}


def kernels_enabled() -> bool:
    """False when the user forces the plain pure-MLX path with MLX_XLSTM_KERNELS=0."""
    return os.environ.get("MLX_XLSTM_KERNELS", "1").strip() != "0"


def _on_gpu() -> bool:
    return mx.default_device().type == mx.DeviceType.gpu


@functools.lru_cache(maxsize=None)
def _fused_step(kernel, eps: float):
    """The kernel as a differentiable function: forward fused, backward through the ops step."""

    def reference(q, k, v, i, log_f, C, n, m):
        h, (C, n, m) = ops.mlstm_step(q, k, v, i, log_f, C, n, m, eps=eps)
        return h, C, n, m

    @mx.custom_function
    def fused(q, k, v, i, log_f, C, n, m):
        h, (C, n, m) = _step.launch(kernel, q, k, v, i, log_f, C, n, m, eps)
        return h, C, n, m

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        return tuple(mx.vjp(reference, list(primals), list(cotangents))[1])

    return fused


def _step_shapes_fit(q, k, v, i, log_f, C, n, m) -> bool:
    if C.ndim != 4 or C.dtype != _STATE_DTYPE:
        return False
    B, H, Dqk, Dv = C.shape
    return (
        q.shape == k.shape == n.shape == (B, H, Dqk)
        and v.shape == (B, H, Dv)
        and i.shape == log_f.shape == m.shape == (B, H)
        and n.dtype == m.dtype == _STATE_DTYPE
        and all(x.dtype in _INPUT_DTYPES for x in (q, k, v))
    )


def _random_step_inputs(B=2, H=2, Dqk=16, Dv=40, dtype=mx.float32):
    """A small random decode step with one masked sequence; state from a few random steps."""
    keys = mx.random.split(mx.random.key(7), 9)
    normal = lambda key, shape, scale=1.0: scale * mx.random.normal(shape, key=key)
    q, k = (normal(keys[j], (B, H, Dqk)).astype(dtype) for j in (0, 1))
    v = normal(keys[2], (B, H, Dv)).astype(dtype)
    i = normal(keys[3], (B, H), 3.0)
    log_f = -mx.abs(normal(keys[4], (B, H)))
    i[0] = ops.MASKED_I
    log_f[0] = 0.0
    C = normal(keys[5], (B, H, Dqk, Dv))
    n = normal(keys[6], (B, H, Dqk))
    m = normal(keys[7], (B, H))
    return q, k, v, i, log_f, C, n, m


def _matches_ops(kernel) -> bool:
    """Compare the kernel with the pure-MLX step (fp32 and bf16 inputs, a masked sequence)."""
    for dtype in (mx.float32, mx.bfloat16):
        args = _random_step_inputs(dtype=dtype)
        want_h, want_state = ops.mlstm_step(*args)
        got_h, got_state = _step.launch(kernel, *args, 1e-6)
        for got, want in zip((got_h, *got_state), (want_h, *want_state)):
            if not mx.allclose(got, want, rtol=1e-4, atol=1e-5).item():
                return False
    return True


def _step_kernel_ok() -> bool:
    if _verified["step"] is None:
        try:
            ok = _matches_ops(_step.kernel)
            reason = "its output differs from the pure-MLX step"
        except Exception as e:  # a kernel that does not compile or launch
            ok, reason = False, f"it failed: {e}"
        if not ok:
            warnings.warn(
                f"mlx_lm_xlstm: the fused mLSTM step kernel is disabled because {reason}; "
                "using the pure-MLX path (set MLX_XLSTM_KERNELS=0 to silence this)."
            )
        _verified["step"] = ok
    return _verified["step"]


def mlstm_step(q, k, v, i, log_f, C, n, m, eps=1e-6):
    """One decode step; arguments and result as `mlx_lm_xlstm.mlstm.mlstm_step`."""
    if (
        _step.kernel is not None
        and kernels_enabled()
        and _on_gpu()
        and _step_shapes_fit(q, k, v, i, log_f, C, n, m)
        and _step_kernel_ok()
    ):
        h, C, n, m = _fused_step(_step.kernel, float(eps))(q, k, v, i, log_f, C, n, m)
        return h, (C, n, m)
    step = _compiled_step if kernels_enabled() else ops.mlstm_step
    return step(q, k, v, i, log_f, C, n, m, eps=eps)


def mlstm_chunkwise(q, k, v, i, log_f, C, n, m, chunk_size=64, eps=1e-6):
    """Prefill; arguments and result as `mlx_lm_xlstm.mlstm.mlstm_chunkwise` (pure MLX)."""
    chunkwise = _compiled_chunkwise if kernels_enabled() else ops.mlstm_chunkwise
    return chunkwise(q, k, v, i, log_f, C, n, m, chunk_size=chunk_size, eps=eps)


# The cell is many small elementwise ops around a few matmuls: compiling fuses them into
# far fewer launches.
_compiled_step = mx.compile(ops.mlstm_step)
_compiled_chunkwise = mx.compile(ops.mlstm_chunkwise)
