"""Fused kernels for the mLSTM layer: Metal and CUDA twins of four reference functions.

  - `step.py`: the recurrence of decode steps and other short calls (`mlstm.mlstm_step_ops`),
  - `chunk_states.py`: the chunk-to-chunk recurrence of prefill (`mlstm.chunk_states_ops`);
    the rest of prefill is matmuls and elementwise ops, left to MLX under `mx.compile`,
  - `gated_norm.py`: xLSTM-7b's per-head norm and output gate (`large.gated_head_norm_ops`),
  - `gates.py`: xLSTM-7b's input and forget gates from the tokens (`large.head_gates_ops`).
`mlstm.mlstm_update` runs `mlstm_step_kernel` / `chunk_states_kernel` where
`mlstm_step_kernel_applies` / `chunk_states_kernel_applies` say yes; `large.gated_head_norm`
and `large.head_gates` likewise. A kernel applies when
  - it was built (`gpu.build`: a Metal or CUDA GPU is there) and the default device is the GPU,
  - the shapes and dtypes are ones it takes (fp32 state, fp32/fp16/bf16 inputs),
  - it matched the reference on a small random input the first time it was asked for
    (on this machine with this MLX: a pass is remembered in MLX_XLSTM_CACHE_DIR).
On CUDA the kernels are compiled once per machine and kept there too (`cuda.py`). On both
backends the sizes that change from call to call (a piece's chunk count, a call's tokens)
are launch arguments (`cuda.py`, `metal.py`): one binary serves every prompt length.
Each kernel has the reference's VJP (`mx.custom_function`), so training through it is exact.
"""

import contextlib
import functools
import hashlib
import warnings
from pathlib import Path

import mlx.core as mx

from . import chunk_states as _chunk_states
from . import cuda as _cuda
from . import gated_norm as _gated_norm
from . import gates as _gates
from . import step as _step

__all__ = [
    "mlstm_step_kernel", "mlstm_step_kernel_applies", "chunk_states_kernel", "chunk_states_kernel_applies",
    "gated_head_norm_kernel", "gated_head_norm_kernel_applies", "head_gates_kernel", "head_gates_kernel_applies",
]

_STATE_DTYPE = mx.float32
_INPUT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
# None: not checked yet; then True/False once the first-use comparison has run.
_verified = {"step": None, "chunk_states": None, "gated_norm": None, "gates": None}


def _reference():
    """The pure-MLX functions of the cell the kernels replace (imported late: `mlstm` imports us)."""
    from .. import mlstm

    return mlstm


def _large_reference():
    from .. import large

    return large


def _on_gpu() -> bool:
    return mx.default_device().type == mx.DeviceType.gpu


# Off while a decode step is traced (`without_vjp`).
_with_vjp = True


@contextlib.contextmanager
def without_vjp():
    """Kernels called inside run bare, not wrapped in their VJP: for the compiled decode step
    and trim replays, which generation never differentiates; each wrapper is one more op
    of every step for the host to run."""
    global _with_vjp
    saved, _with_vjp = _with_vjp, False
    try:
        yield
    finally:
        _with_vjp = saved


def _with_ops_vjp(kernel_fn, ops_fn):
    """`kernel_fn` forward, differentiated through `ops_fn`, the pure-MLX function of the same
    arguments and (flattened) results: training through a kernel is exact."""
    fused = mx.custom_function(kernel_fn)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        return tuple(mx.vjp(ops_fn, list(primals), list(cotangents))[1])

    return lambda *args: fused(*args) if _with_vjp else kernel_fn(*args)


def _flat(result):
    """(a, (b, c)) -> [a, b, c]."""
    return [y for x in result for y in (x if isinstance(x, tuple) else (x,))]


@functools.lru_cache(maxsize=None)
def _fused_step(kernel, eps: float):
    return _with_ops_vjp(
        lambda *args: _flat(_step.launch(kernel, *args, eps)),
        lambda *args: _flat(_reference().mlstm_step_ops(*args, eps=eps)),
    )


def _unpacked(qkv, offsets, i, C):
    """q, k, v: the columns of qkv (B * T rows) from these offsets, in heads."""
    B, T, H = i.shape
    Dqk, Dv = C.shape[-2:]
    columns = lambda start, width: qkv[:, start : start + width].reshape(B, T, H, -1)
    return columns(offsets[0], H * Dqk), columns(offsets[1], H * Dqk), columns(offsets[2], H * Dv)


@functools.lru_cache(maxsize=None)
def _fused_packed_step(kernel, eps: float, offsets: tuple):
    """The step kernel reading q, k, v in place from one array: a function of (qkv, i, log_f, C, n, m)."""
    return _with_ops_vjp(
        lambda qkv, *rest: _flat(_step.launch(kernel, None, None, None, *rest, eps, packed=(qkv, offsets))),
        lambda qkv, i, log_f, C, n, m: _flat(
            _reference().mlstm_step_ops(*_unpacked(qkv, offsets, i, C), i, log_f, C, n, m, eps=eps)
        ),
    )


def _packed_fits(packed, q, v) -> bool:
    """q and v (B, T, H, D) are where `packed` says: columns of a (B * T, E) array of their dtype."""
    qkv, offsets = packed
    B, T, H, Dqk = q.shape
    widths = (H * Dqk, H * Dqk, H * v.shape[-1])
    return (
        qkv.ndim == 2
        and qkv.shape[0] == B * T
        and qkv.dtype == q.dtype
        and len(offsets) == 3
        and all(0 <= o and o + w <= qkv.shape[1] for o, w in zip(offsets, widths))
    )


def _step_shapes_fit(q, k, v, i, log_f, C, n, m) -> bool:
    if C.ndim != 4 or C.dtype != _STATE_DTYPE or q.ndim != 4:
        return False
    B, H, Dqk, Dv = C.shape
    T = q.shape[1]
    return (
        q.shape == k.shape == (B, T, H, Dqk)
        and v.shape == (B, T, H, Dv)
        and i.shape == log_f.shape == (B, T, H)
        and n.shape == (B, H, Dqk)
        and m.shape == (B, H)
        and n.dtype == m.dtype == _STATE_DTYPE
        and all(x.dtype in _INPUT_DTYPES for x in (q, k, v))
    )


def _random_step_inputs(B=2, T=3, H=2, Dqk=16, Dv=40, dtype=mx.float32):
    """A few random tokens with masked ones (all of sequence 0's second token); a random state."""
    keys = mx.random.split(mx.random.key(7), 9)
    normal = lambda key, shape, scale=1.0: scale * mx.random.normal(shape, key=key)
    q, k = (normal(keys[j], (B, T, H, Dqk)).astype(dtype) for j in (0, 1))
    v = normal(keys[2], (B, T, H, Dv)).astype(dtype)
    i = normal(keys[3], (B, T, H), 3.0)
    log_f = -mx.abs(normal(keys[4], (B, T, H)))
    i[0, min(1, T - 1)] = _reference().MASKED_I
    log_f[0, min(1, T - 1)] = 0.0
    C = normal(keys[5], (B, H, Dqk, Dv))
    n = normal(keys[6], (B, H, Dqk))
    m = normal(keys[7], (B, H))
    return q, k, v, i, log_f, C, n, m


def _random_chunk_inputs(B=2, H=2, NC=5, Dqk=16, Dv=40, dtype=mx.float32):
    """Chunk contributions with one all-masked chunk (a_max = MASKED_I, g = 0)."""
    keys = mx.random.split(mx.random.key(8), 7)
    normal = lambda key, shape, scale=1.0: scale * mx.random.normal(shape, key=key)
    g = -mx.abs(normal(keys[0], (B, H, NC), 4.0))
    a_max = normal(keys[1], (B, H, NC), 3.0)
    g[:, :, 2] = 0.0
    a_max[:, :, 2] = _reference().MASKED_I
    dC = normal(keys[2], (B, H, NC, Dqk, Dv)).astype(dtype)
    dn = normal(keys[3], (B, H, NC, Dqk))
    return g, a_max, dC, dn, normal(keys[4], (B, H, Dqk, Dv)), normal(keys[5], (B, H, Dqk)), normal(keys[6], (B, H))


def _all_close(got, want) -> bool:
    """fp32 results to 1e-4; bf16/fp16 ones (rounded from fp32, maybe an ulp apart) to 1e-2."""
    return all(
        mx.allclose(a, b, rtol=1e-4 if a.dtype == mx.float32 else 1e-2, atol=1e-5).item()
        for a, b in zip(got, want)
    )


def _step_matches_ops() -> bool:
    """The step kernel against the pure-MLX steps (one token and three, fp32 and bf16 inputs,
    masked steps)."""
    for dtype, T in ((mx.float32, 1), (mx.float32, 3), (mx.bfloat16, 3)):
        args = _random_step_inputs(T=T, dtype=dtype)
        want_h, want_state = _reference().mlstm_step_ops(*args)
        got_h, got_state = _step.launch(_step.kernel, *args, 1e-6)
        if not _all_close((got_h, *got_state), (want_h, *want_state)):
            return False
        # q, k, v read in place as columns of one array, after a column block that is not theirs
        q, k, v = args[:3]
        rows = lambda x: x.reshape(x.shape[0] * x.shape[1], -1)
        qkv = mx.concatenate([rows(v), rows(q), rows(k), rows(v)], axis=-1)
        v_width, width = v.shape[2] * v.shape[3], q.shape[2] * q.shape[3]
        offsets = (v_width, v_width + width, v_width + 2 * width)
        got_h, got_state = _step.launch(_step.kernel, None, None, None, *args[3:], 1e-6, packed=(qkv, offsets))
        if not _all_close((got_h, *got_state), (want_h, *want_state)):
            return False
    return True


def _chunk_states_match_ops() -> bool:
    """The chunk-state kernel against `mlstm.chunk_states_ops` (fp32 and bf16 contributions)."""
    for dtype in (mx.float32, mx.bfloat16):
        args = _random_chunk_inputs(dtype=dtype)
        (want_in, want_out), (got_in, got_out) = _reference().chunk_states_ops(*args), _chunk_states.launch(_chunk_states.kernel, *args)
        if not _all_close((*got_in, *got_out), (*want_in, *want_out)):
            return False
    return True


def _random_norm_inputs(B=2, T=3, H=2, Dv=40, dtype=mx.float32, bias=True):
    """h with a large offset per head (the mean must come out), the q|k|v|o output with o last."""
    keys = mx.random.split(mx.random.key(9), 5)
    h = 3.0 + 2.0 * mx.random.normal((B, T, H, Dv), key=keys[0])
    qkvo = mx.random.normal((B, T, 3 * H * Dv), key=keys[1]).astype(dtype)
    weight = (1.0 + 0.5 * mx.random.normal((H * Dv,), key=keys[2])).astype(dtype)
    b = (0.5 * mx.random.normal((H * Dv,), key=keys[3])).astype(dtype) if bias else None
    return h, qkvo, weight, b, 2 * H * Dv


def _gated_norm_matches_ops() -> bool:
    """The gated head norm against `large.gated_head_norm_ops` (fp32 and bf16, with and without
    bias). In bf16 the ops round three times (the normed value, the gate, their product) and the
    kernel once: a few bf16 ulps apart, where a wrong kernel is off by whole units."""
    for dtype, bias, Dv in ((mx.float32, True, 40), (mx.bfloat16, False, 512)):
        h, qkvo, weight, b, o_start = _random_norm_inputs(Dv=Dv, dtype=dtype, bias=bias)
        want = _large_reference().gated_head_norm_ops(h, qkvo, weight, b, o_start, 1e-6).astype(mx.float32)
        got = _gated_norm.launch(_gated_norm.kernel, h, qkvo, weight, b, o_start, 1e-6).astype(mx.float32)
        close = _all_close((got,), (want,)) if dtype == mx.float32 else mx.allclose(got, want, rtol=2**-5, atol=2**-7).item()
        if not close:
            return False
    return True


def _random_gate_inputs(M=3, G=6, K=72, dtype=mx.float32):
    """Tokens, fp32 gate weights and biases with pre-activations past the cap either way."""
    keys = mx.random.split(mx.random.key(10), 3)
    x = mx.random.normal((M, K), key=keys[0]).astype(dtype)
    weight = 3.0 * mx.random.normal((G, K), key=keys[1]) * K**-0.5
    bias = mx.array([30.0, -30.0] + [0.5] * (G - 2)) + mx.random.normal((G,), key=keys[2])
    return x, weight, bias


def _gates_match_ops() -> bool:
    """The gate kernel against `large.head_gates_ops` (fp32 and bf16 tokens and weights; a
    short call and a prompt's, whose threadgroups take several tokens, the last group part
    full). The reference runs on the CPU: on CUDA, MLX's fp32 matmuls take TF32 unless
    MLX_ENABLE_TF32=0, 10 bits of mantissa where the kernel sums in fp32."""
    for x_dtype, w_dtype, M in ((mx.float32, mx.float32, 3), (mx.bfloat16, mx.bfloat16, _gates.GROUPED_FROM + 3)):
        x, weight, bias = _random_gate_inputs(M=M, dtype=x_dtype)
        weight, bias = weight.astype(w_dtype), bias.astype(w_dtype)
        with mx.stream(mx.cpu):
            want = _large_reference().head_gates_ops(x, weight, bias, 15.0)
            mx.eval(want)
        if not _all_close(_gates.launch(_gates.kernel, x, weight, bias, 15.0), want):
            return False
    return True


_CHECKS = {
    "step": _step_matches_ops, "chunk_states": _chunk_states_match_ops, "gated_norm": _gated_norm_matches_ops,
    "gates": _gates_match_ops,
}


_MODULES = {"step": _step, "chunk_states": _chunk_states, "gated_norm": _gated_norm, "gates": _gates}


def _verdict_file(name: str):
    """Where a passed first-use check of this machine's own kernel is remembered: keyed by
    the kernel's module source, the GPU and the MLX version (a new one checks again)."""
    module = _MODULES[name]
    if module.kernel is not module.BUILT:  # a kernel a test stands in is always checked
        return None
    text = Path(module.__file__).read_text() + _cuda.PRELUDE + _cuda.device_signature()
    return _cuda.cache_dir() / "checks" / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"


def _kernel_ok(name: str) -> bool:
    """Run the kernel's first-use comparison once per machine (a pass is remembered on disk,
    so later processes skip it); on a mismatch or failure, warn and say no."""
    if _verified[name] is None:
        verdict = _verdict_file(name)
        if verdict is not None and verdict.exists():
            _verified[name] = True
            return True
        try:
            ok = _CHECKS[name]()
            reason = "its output differs from the pure-MLX path"
        except Exception as e:  # a kernel that does not compile or launch
            ok, reason = False, f"it failed: {e}"
        if not ok:
            warnings.warn(
                f"mlx_lm_xlstm: the fused mLSTM {name} kernel is disabled because {reason}; "
                "using the pure-MLX path (set MLX_XLSTM_KERNELS=0 to silence this)."
            )
        elif verdict is not None:
            try:
                verdict.parent.mkdir(parents=True, exist_ok=True)
                verdict.touch()
            except OSError:  # a read-only home: check again next time
                pass
        _verified[name] = ok
    return _verified[name]


def mlstm_step_kernel_applies(q, k, v, i, log_f, C, n, m) -> bool:
    return _step.kernel is not None and _on_gpu() and _step_shapes_fit(q, k, v, i, log_f, C, n, m) and _kernel_ok("step")


def mlstm_step_kernel(q, k, v, i, log_f, C, n, m, eps=1e-6, packed=None):
    """T recurrent steps by the kernel; arguments and result as `mlstm.mlstm_step_ops`.
    packed: (qkv, (q_off, k_off, v_off)) where q, k, v are those columns of qkv (B * T rows),
    which the kernel then reads in place (`step.launch`), or None."""
    if packed is not None and _packed_fits(packed, q, v):
        qkv, offsets = packed
        h, C, n, m = _fused_packed_step(_step.kernel, float(eps), tuple(offsets))(qkv, i, log_f, C, n, m)
    else:
        h, C, n, m = _fused_step(_step.kernel, float(eps))(q, k, v, i, log_f, C, n, m)
    return h, (C, n, m)


def chunk_states_kernel_applies(C, n, m) -> bool:
    return (
        _chunk_states.kernel is not None
        and _on_gpu()
        and C.dtype == n.dtype == m.dtype == _STATE_DTYPE
        and _kernel_ok("chunk_states")
    )


# The kernel is looked up at each call (tests stand one in).
_fused_chunk_states = _with_ops_vjp(
    lambda *args: _flat(_chunk_states.launch(_chunk_states.kernel, *args)),
    lambda *args: _flat(_reference().chunk_states_ops(*args)),
)


def chunk_states_kernel(g, a_max, dC, dn, C, n, m):
    """The chunk states by the kernel; arguments and result as `mlstm.chunk_states_ops`."""
    C_in, n_in, m_in, C, n, m = _fused_chunk_states(g, a_max, dC, dn, C, n, m)
    return (C_in, n_in, m_in), (C, n, m)


@functools.lru_cache(maxsize=None)
def _fused_gated_norm(kernel, o_start: int, eps: float, bias: bool):
    """Of (h, qkvo, weight, bias), or of (h, qkvo, weight) without a bias (a custom function
    takes arrays only)."""
    four = (lambda *args: args) if bias else (lambda *args: (*args, None))
    return _with_ops_vjp(
        lambda *args: [_gated_norm.launch(kernel, *four(*args), o_start, eps)],
        lambda *args: [_large_reference().gated_head_norm_ops(*four(*args), o_start, eps)],
    )


def gated_head_norm_kernel_applies(h, qkvo, weight, bias, o_start) -> bool:
    if _gated_norm.kernel is None or not _on_gpu() or h.ndim < 3 or qkvo.ndim < 1:
        return False
    H, Dv = h.shape[-2:]
    return (
        h.dtype == _STATE_DTYPE
        and h.size == qkvo.size // qkvo.shape[-1] * H * Dv
        and qkvo.shape[-1] - o_start == H * Dv
        and weight.shape == (H * Dv,)
        and (bias is None or bias.shape == weight.shape)
        and all(x.dtype in _INPUT_DTYPES for x in (qkvo, weight) + (() if bias is None else (bias,)))
        and _kernel_ok("gated_norm")
    )


def gated_head_norm_kernel(h, qkvo, weight, bias, o_start, eps=1e-6):
    """The gated head norm by the kernel; arguments and result as `large.gated_head_norm_ops`."""
    fused = _fused_gated_norm(_gated_norm.kernel, int(o_start), float(eps), bias is not None)
    return fused(h, qkvo, weight, *(() if bias is None else (bias,)))[0]


@functools.lru_cache(maxsize=None)
def _fused_gates(kernel, cap: float):
    return _with_ops_vjp(
        lambda *args: list(_gates.launch(kernel, *args, cap)),
        lambda *args: list(_large_reference().head_gates_ops(*args, cap)),
    )


def head_gates_kernel_applies(x, weight, bias) -> bool:
    if _gates.kernel is None or not _on_gpu() or x.ndim < 1 or weight.ndim != 2:
        return False
    G, K = weight.shape
    return (
        x.shape[-1] == K
        and G % 2 == 0
        and 0 < G <= _gates.MAX_ROWS
        and bias.shape == (G,)
        and all(a.dtype in _INPUT_DTYPES for a in (x, weight, bias))
        and _kernel_ok("gates")
    )


def head_gates_kernel(x, weight, bias, cap: float, lead=None):
    """The gates by the kernel; arguments as `large.head_gates`. Undifferentiated (the
    compiled decode step) the kernel writes them in `lead`; in its VJP wrapper in x's leading
    shape, which `large.head_gates` reshapes (a wrapper per shape would pile up)."""
    if lead is not None and not _with_vjp:
        return _gates.launch(_gates.kernel, x, weight, bias, float(cap), lead)
    i, log_f = _fused_gates(_gates.kernel, float(cap))(x, weight, bias)
    return i, log_f
