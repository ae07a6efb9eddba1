"""The fused kernels (decode step, prefill chunk states, gated head norm, gates): dispatch and fallback (run
everywhere, with stand-in kernels), the CUDA sources (compiled with nvcc where it is
installed) and kernel-vs-ops parity (on a GPU: CUDA or Metal)."""

import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_lm_xlstm import kernels, large
from mlx_lm_xlstm import mlstm as ops
from mlx_lm_xlstm.kernels import chunk_states, cuda, gated_norm, gates, gpu, metal, step
from mlx_lm_xlstm.kernels.spelling import CUDA

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import bench  # noqa: E402  (its graph-op count)

ON_GPU = step.kernel is not None
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="no Metal or CUDA device: kernel not built")


def random_step(B, H, Dqk, Dv, dtype, key, masked=(), T=1):
    """T random tokens in the model's (B, T, H, D) layout; the sequences in `masked` masked
    at every token; a random state."""
    keys = mx.random.split(mx.random.key(key), 8)
    q, k = (mx.random.normal((B, T, H, Dqk), key=keys[j]).astype(dtype) for j in (0, 1))
    v = mx.random.normal((B, T, H, Dv), key=keys[2]).astype(dtype)
    i = 4 * mx.random.normal((B, T, H), key=keys[3])
    log_f = -mx.abs(mx.random.normal((B, T, H), key=keys[4]))
    for b in masked:
        i[b] = ops.MASKED_I
        log_f[b] = 0.0
    C = mx.random.normal((B, H, Dqk, Dv), key=keys[5])
    n = mx.random.normal((B, H, Dqk), key=keys[6])
    m = 2 * mx.random.normal((B, H), key=keys[7])
    return q, k, v, i, log_f, C, n, m


def assert_close(got, want, rtol, atol):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert not mx.isnan(g).any().item()
        assert mx.allclose(g, w, rtol=rtol, atol=atol).item(), mx.abs(g - w).max().item()


def flat(result):
    h, (C, n, m) = result
    return h, C, n, m


def dispatch_step(q, k, v, i, log_f, C, n, m, eps=1e-6):
    """Up to STEP_CALL tokens through `mlstm_update`: the step kernel where it applies, the
    compiled step (one token) or chunkwise form otherwise."""
    return ops.mlstm_update(q, k, v, i, log_f, (C, n, m), eps=eps)


def dispatch_chunkwise(q, k, v, i, log_f, C, n, m, chunk_size=64, eps=1e-6):
    """One chunkwise piece as `mlstm_update` runs it."""
    return ops._chunkwise(q, k, v, i, log_f, (C, n, m), chunk_size, eps)


# ---- dispatch, on any machine: stand-in kernels that compute with the ops functions ----


def step_outputs(inputs, template, grid, threadgroup):
    q, k, v, i, log_f, C, n, m, eps = inputs
    B, T, H = i.shape
    assert template["DQK"] == C.shape[2] and grid[0] % 32 == 0
    assert template["STEPS"] == T and template["NH"] == H
    assert grid[1] == threadgroup[1] == step.ROWS and grid[2] == B * H

    def heads(x, name, D):  # the kernel's reads: a token's row of *_STRIDE, from *_OFF
        start = template[f"{name}_OFF"]
        return x.reshape(B * T, template[f"{name}_STRIDE"])[:, start : start + H * D].reshape(B, T, H, D)

    q, k, v = heads(q, "Q", C.shape[2]), heads(k, "K", C.shape[2]), heads(v, "V", C.shape[3])
    h, (C, n, m) = ops.mlstm_step_ops(q, k, v, i, log_f, C, n, m, eps=eps.item())
    return [h, C, n, m]


def chunk_state_outputs(inputs, template, grid, threadgroup):
    g, a_max, dC, dn, C, n, m = inputs
    assert template["NC"] == g.shape[-1] and grid[0] % threadgroup[0] == 0
    assert grid[0] >= dC.shape[-1] * dC.shape[-2] + dn.shape[-1] and grid[1] == g.shape[0] * g.shape[1]
    (C_in, n_in, m_in), (C, n, m) = ops.chunk_states_ops(g, a_max, dC, dn, C, n, m)
    return [C_in, n_in, m_in, C, n, m]


class StandInKernel:
    """Answers a `launch` call like a compiled kernel, computing with the ops function;
    `wrong` spoils the first fp32 output."""

    def __init__(self, outputs, wrong=False):
        self.outputs = outputs
        self.calls = 0
        self.wrong = wrong

    def __call__(self, inputs, template, grid, threadgroup, output_shapes, output_dtypes, verbose):
        self.calls += 1
        # a kernel writes its outputs in the shapes it is given
        out = [o.reshape(shape) for o, shape in zip(self.outputs(inputs, dict(template), grid, threadgroup), output_shapes)]
        if self.wrong:
            j = output_dtypes.index(mx.float32)
            out[j] = out[j] + 1.0
        return out


def install_stand_in(monkeypatch, name, module, outputs, wrong):
    kernel = StandInKernel(outputs, wrong)
    monkeypatch.setattr(module, "kernel", kernel)
    monkeypatch.setattr(kernels, "_on_gpu", lambda: True)
    monkeypatch.setitem(kernels._verified, name, None)
    monkeypatch.delenv("MLX_XLSTM_KERNELS", raising=False)
    return kernel


def gated_norm_outputs(inputs, template, grid, threadgroup):
    h, qkvo, weight, bias, eps = inputs
    assert template["NH"] == h.shape[2] and template["DV"] == h.shape[3] and template["E"] == qkvo.shape[-1]
    assert threadgroup[0] == template["TPB"] and grid[0] == template["TPB"] * h.shape[0] * h.shape[1] * h.shape[2]
    assert grid[1] == grid[2] == 1  # CUDA takes at most 65,535 threadgroups along y and z
    bias = bias if template["HAS_BIAS"] else None
    return [large.gated_head_norm_ops(h, qkvo, weight, bias, template["O_START"], eps.item())]


def gates_outputs(inputs, template, grid, threadgroup):
    x, weight, bias, cap = inputs
    G, K = weight.shape
    tokens = x.size // K
    assert template["G"] == G and template["K"] == K and template["M"] == tokens and threadgroup[0] == 32 * G
    assert template["TOK"] == (gates.TOKENS_A_GROUP if tokens >= gates.GROUPED_FROM else 1)  # a prompt's groups
    assert grid[0] == 32 * G * -(-tokens // template["TOK"]) and grid[1] == grid[2] == 1
    return list(large.head_gates_ops(x, weight, bias, cap.item()))


@pytest.fixture
def stand_in(monkeypatch):
    return lambda wrong=False: install_stand_in(monkeypatch, "step", step, step_outputs, wrong)


@pytest.fixture
def stand_in_chunk_states(monkeypatch):
    return lambda wrong=False: install_stand_in(monkeypatch, "chunk_states", chunk_states, chunk_state_outputs, wrong)


@pytest.fixture
def stand_in_gated_norm(monkeypatch):
    return lambda wrong=False: install_stand_in(monkeypatch, "gated_norm", gated_norm, gated_norm_outputs, wrong)


@pytest.fixture
def stand_in_gates(monkeypatch):
    return lambda wrong=False: install_stand_in(monkeypatch, "gates", gates, gates_outputs, wrong)


def test_each_kernel_is_built_for_the_gpu_there_and_none_without(monkeypatch):
    """kernels.gpu.build: Metal where Metal is, else CUDA (with the step's launch bounds), else none."""
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: False)
    assert gpu.build(step.NAME, step.INPUTS, step.OUTPUTS, step.source, step.RUNTIME) is None
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    built = gpu.build(step.NAME, step.INPUTS, step.OUTPUTS, step.source, step.RUNTIME, launch_bounds=step.LAUNCH_BOUNDS)
    assert isinstance(built, cuda.Kernel) and built.runtime == ("STEPS",) and "__launch_bounds__(512, 2)" in built.bounds
    assert built.body == step.source(CUDA)
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    built = gpu.build(chunk_states.NAME, chunk_states.INPUTS, chunk_states.OUTPUTS, chunk_states.source, chunk_states.RUNTIME)
    assert isinstance(built, metal.Kernel) and built.runtime == ("NC",)


def test_dispatch_uses_the_kernel_after_checking_it(stand_in):
    kernel = stand_in()
    args = random_step(2, 2, 8, 24, mx.float32, key=1, masked=[1])
    assert_close(flat(dispatch_step(*args)), flat(ops.mlstm_step_ops(*args)), 1e-6, 1e-6)
    checks = kernel.calls - 1  # the first-use comparison ran the kernel too
    assert checks >= 1 and kernels._verified["step"] is True
    dispatch_step(*args)
    assert kernel.calls == checks + 2  # checked once only


def test_a_passed_check_is_remembered_for_this_machines_kernel(stand_in, monkeypatch, tmp_path):
    """A new process (first-use state cleared) skips the check a pass left in MLX_XLSTM_CACHE_DIR."""
    monkeypatch.setenv("MLX_XLSTM_CACHE_DIR", str(tmp_path))
    kernel = stand_in()
    monkeypatch.setattr(step, "BUILT", kernel)  # as if this machine had built it
    args = random_step(2, 2, 8, 24, mx.float32, key=1, masked=[1])
    dispatch_step(*args)
    first = kernel.calls
    assert first >= 2 and len(list(tmp_path.rglob("step-*"))) == 1
    monkeypatch.setitem(kernels._verified, "step", None)
    dispatch_step(*args)
    assert kernel.calls == first + 1 and kernels._verified["step"] is True


def test_a_failed_check_is_not_remembered(stand_in, monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_XLSTM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(step, "BUILT", stand_in(wrong=True))
    with pytest.warns(UserWarning, match="fused mLSTM step kernel is disabled"):
        dispatch_step(*random_step(2, 2, 8, 24, mx.float32, key=1))
    assert not list(tmp_path.rglob("step-*"))


def test_a_cuda_binary_is_compiled_once_per_machine(monkeypatch, tmp_path):
    """kernels/cuda.py keeps each unit's binary on disk, per source and GPU architecture."""
    monkeypatch.setenv("MLX_XLSTM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cuda, "_architecture", lambda: (9, 0))
    compiles = []

    class CountingNVRTC:
        def compile(self, source, name, arch, binary):
            compiles.append(arch)
            return f"{arch}:{source}".encode()

    monkeypatch.setattr(cuda, "_nvrtc", CountingNVRTC())
    first = cuda.compiled("unit A", "k")
    assert cuda.compiled("unit A", "k") == first and compiles == ["sm_90"]
    cuda.compiled("unit B", "k")
    monkeypatch.setattr(cuda, "_architecture", lambda: (10, 0))
    assert cuda.compiled("unit A", "k") == b"sm_100:unit A" and compiles == ["sm_90", "sm_90", "sm_100"]


def test_short_calls_run_in_the_step_kernel_and_prompts_chunkwise(stand_in, monkeypatch):
    """mlstm_update sends calls of up to STEP_CALL tokens (a verify call) to the step
    kernel, longer ones to the chunkwise form; both give the reference's result."""
    kernel = stand_in()
    monkeypatch.setattr(kernels, "chunk_states_kernel_applies", lambda *state: False)
    for T, in_kernel in ((1, True), (5, True), (ops.STEP_CALL, True), (ops.STEP_CALL + 1, False), (ops.SHORT_CALL + 1, False)):
        q, k, v, i, _, C, n, m = random_step(2, 2, 8, 24, mx.float32, key=T, T=T)
        f = mx.random.normal(i.shape, key=mx.random.key(T))
        before = kernel.calls
        got = ops.mlstm_update(q, k, v, i, ops.nn.log_sigmoid(f), (C, n, m), chunk_size=4)
        assert (kernel.calls > before) == in_kernel, T
        want = ops.mlstm_step_ops(q, k, v, i, ops.nn.log_sigmoid(f), C, n, m)
        assert_close(flat(got), flat(want), 1e-4, 1e-5)


def packed_step(B, T, H, Dqk, Dv, dtype, key):
    """A step's inputs with q, k, v also as columns of one (B * T, E) array, as xLSTM-7b's
    fused projection holds them (o's columns after them)."""
    q, k, v, i, log_f, C, n, m = random_step(B, H, Dqk, Dv, dtype, key=key, masked=[0], T=T)
    rows = lambda x: x.reshape(B * T, -1)
    qkvo = mx.concatenate([rows(q), rows(k), rows(v), rows(v)], axis=-1)
    return (q, k, v, i, log_f, C, n, m), (qkvo, (0, H * Dqk, 2 * H * Dqk))


def test_the_step_kernel_reads_q_k_v_in_place(stand_in):
    kernel = stand_in()
    for T in (1, 3):
        args, packed = packed_step(3, T, 2, 8, 24, mx.float32, key=T)
        calls = kernel.calls
        got = ops.mlstm_update(*args[:5], args[5:], packed=packed)
        assert kernel.calls > calls
        assert_close(flat(got), flat(ops.mlstm_step_ops(*args)), 1e-5, 1e-6)
    # a packed array that does not hold them is not read
    got = kernels.mlstm_step_kernel(*args, packed=(packed[0][:, :10], packed[1]))
    assert_close(flat(got), flat(ops.mlstm_step_ops(*args)), 1e-5, 1e-6)


def test_gradients_through_the_packed_step_kernel_are_the_ops_gradients(stand_in):
    stand_in()
    args, (qkvo, offsets) = packed_step(2, 2, 2, 8, 16, mx.float32, key=5)

    def loss(qkvo, i, C, packed):
        q, k, v = kernels._unpacked(qkvo, offsets, i, C)
        h, (C2, n2, m2) = ops.mlstm_update(q, k, v, i, args[4], (C, *args[6:]), packed=(qkvo, offsets) if packed else None)
        return (h * h).sum() + C2.sum() + n2.sum()

    got = mx.grad(loss, argnums=(0, 1, 2))(qkvo, args[3], args[5], True)
    want = mx.grad(loss, argnums=(0, 1, 2))(qkvo, args[3], args[5], False)
    for g, w in zip(got, want):
        assert mx.allclose(g, w, rtol=1e-4, atol=1e-5).item()


def test_kernels_run_bare_where_nothing_is_differentiated(stand_in):
    """The compiled decode step traces the kernels without their VJP wrapper (one op fewer
    each, every step); elsewhere they keep it, so training through them stays exact."""
    stand_in()
    args = random_step(2, 2, 8, 24, mx.float32, key=3)
    wrapped = flat(dispatch_step(*args))
    with kernels.without_vjp():
        bare = flat(dispatch_step(*args))
    assert "CustomTransforms" in bench.graph_ops(wrapped) and "CustomTransforms" not in bench.graph_ops(bare)
    assert_close(bare, wrapped, 0, 0)
    assert kernels._with_vjp is True


def test_env_variable_forces_the_ops_path(stand_in, monkeypatch):
    kernel = stand_in()
    monkeypatch.setenv("MLX_XLSTM_KERNELS", "0")
    args = random_step(1, 2, 8, 24, mx.float32, key=2)
    assert_close(flat(dispatch_step(*args)), flat(ops.mlstm_step_ops(*args)), 1e-6, 1e-6)
    assert kernel.calls == 0


def test_a_wrong_kernel_warns_once_and_falls_back(stand_in):
    kernel = stand_in(wrong=True)
    args = random_step(2, 1, 8, 24, mx.float32, key=3)
    with pytest.warns(UserWarning, match="fused mLSTM step kernel is disabled"):
        got = dispatch_step(*args)
    assert_close(flat(got), flat(ops.mlstm_step_ops(*args)), 1e-6, 1e-6)
    calls = kernel.calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dispatch_step(*args)
    assert kernel.calls == calls and kernels._verified["step"] is False


def test_a_kernel_that_raises_falls_back(stand_in, monkeypatch):
    stand_in()
    monkeypatch.setattr(step, "kernel", lambda **kw: (_ for _ in ()).throw(RuntimeError("nvrtc")))
    args = random_step(1, 1, 8, 24, mx.float32, key=4)
    with pytest.warns(UserWarning, match="nvrtc"):
        got = dispatch_step(*args)
    assert_close(flat(got), flat(ops.mlstm_step_ops(*args)), 1e-6, 1e-6)


def test_unsupported_inputs_take_the_ops_path(stand_in):
    kernel = stand_in()
    q, k, v, i, log_f, C, n, m = random_step(1, 2, 8, 24, mx.float32, key=5)
    dispatch_step(q, k, v, i, log_f, C.astype(mx.bfloat16), n, m)  # state not fp32
    dispatch_step(q.astype(mx.int32), k, v, i, log_f, C, n, m)
    assert kernel.calls == 0


def test_gradients_through_the_kernel_are_the_ops_gradients(stand_in):
    stand_in()
    args = random_step(2, 2, 8, 24, mx.float32, key=6)

    def loss(step_fn):
        def f(q, k, v, C):
            h, (C2, n2, m2) = step_fn(q, k, v, args[3], args[4], C, args[6], args[7])
            return (h * h).sum() + C2.sum() + n2.sum()

        return mx.grad(f, argnums=(0, 1, 2, 3))(args[0], args[1], args[2], args[5])

    for got, want in zip(loss(dispatch_step), loss(ops.mlstm_step_ops)):
        assert mx.allclose(got, want, rtol=1e-5, atol=1e-6).item()


def random_prompt(B, H, T, Dqk, Dv, dtype, key, masked_from=None):
    """Chunkwise inputs and a random state; sequence 0 masked from `masked_from` on."""
    keys = mx.random.split(mx.random.key(key), 8)
    q, k = (mx.random.normal((B, H, T, Dqk), key=keys[j]).astype(dtype) for j in (0, 1))
    v = mx.random.normal((B, H, T, Dv), key=keys[2]).astype(dtype)
    i = 3 * mx.random.normal((B, H, T), key=keys[3])
    log_f = -mx.abs(mx.random.normal((B, H, T), key=keys[4]))
    if masked_from is not None:
        i[0, :, masked_from:] = ops.MASKED_I
        log_f[0, :, masked_from:] = 0.0
    C = mx.random.normal((B, H, Dqk, Dv), key=keys[5])
    n = mx.random.normal((B, H, Dqk), key=keys[6])
    m = mx.random.normal((B, H), key=keys[7])
    return q, k, v, i, log_f, C, n, m


def test_chunkwise_dispatch_uses_the_chunk_state_kernel(stand_in_chunk_states):
    kernel = stand_in_chunk_states()
    args = random_prompt(2, 2, 11, 8, 16, mx.float32, key=8, masked_from=5)
    got = dispatch_chunkwise(*args, chunk_size=4)
    assert kernel.calls >= 2 and kernels._verified["chunk_states"] is True
    assert_close(flat(got), flat(ops.mlstm_chunkwise_ops(*args, chunk_size=4)), 1e-5, 1e-6)


def test_a_wrong_chunk_state_kernel_warns_and_falls_back(stand_in_chunk_states):
    kernel = stand_in_chunk_states(wrong=True)
    args = random_prompt(1, 2, 9, 8, 16, mx.float32, key=9)
    with pytest.warns(UserWarning, match="chunk_states kernel is disabled"):
        got = dispatch_chunkwise(*args, chunk_size=4)
    calls = kernel.calls
    assert_close(flat(got), flat(ops.mlstm_chunkwise_ops(*args, chunk_size=4)), 1e-5, 1e-6)
    dispatch_chunkwise(*args, chunk_size=4)
    assert kernel.calls == calls and kernels._verified["chunk_states"] is False


def test_chunkwise_without_kernels_is_the_ops_path(stand_in_chunk_states, monkeypatch):
    kernel = stand_in_chunk_states()
    monkeypatch.setenv("MLX_XLSTM_KERNELS", "0")
    args = random_prompt(1, 2, 7, 8, 16, mx.float32, key=10)
    got = dispatch_chunkwise(*args, chunk_size=4)
    assert kernel.calls == 0
    assert_close(flat(got), flat(ops.mlstm_chunkwise_ops(*args, chunk_size=4)), 0, 0)


def test_gradients_through_the_chunk_state_kernel_are_the_ops_gradients(stand_in_chunk_states):
    stand_in_chunk_states()
    q, k, v, i, log_f, C, n, m = random_prompt(1, 2, 10, 8, 16, mx.float32, key=12)

    def grads(chunkwise):
        def f(q, k, v, i, C):
            h, (C2, n2, m2) = chunkwise(q, k, v, i, log_f, C, n, m, chunk_size=4)
            return (h * h).sum() + C2.sum() + n2.sum()

        return mx.grad(f, argnums=(0, 1, 2, 3, 4))(q, k, v, i, C)

    for got, want in zip(grads(dispatch_chunkwise), grads(ops.mlstm_chunkwise_ops)):
        assert mx.allclose(got, want, rtol=1e-4, atol=1e-5).item()


def random_norm(B, T, H, Dv, dtype, bias, key=13):
    """h, the fused projection's output with the output gate's columns last, weight, bias."""
    keys = mx.random.split(mx.random.key(key), 4)
    h = 2.0 + 3.0 * mx.random.normal((B, T, H, Dv), key=keys[0])
    qkvo = mx.random.normal((B, T, 3 * H * Dv), key=keys[1]).astype(dtype)
    weight = (1.0 + mx.random.normal((H * Dv,), key=keys[2])).astype(dtype)
    b = mx.random.normal((H * Dv,), key=keys[3]).astype(dtype) if bias else None
    return h, qkvo, weight, b, 2 * H * Dv


@pytest.mark.parametrize("bias", [False, True])
def test_the_layer_runs_its_output_stage_in_the_gated_norm_kernel(stand_in_gated_norm, bias):
    kernel = stand_in_gated_norm()
    args = random_norm(2, 3, 2, 24, mx.float32, bias)
    got = large.gated_head_norm(*args, 1e-6)
    assert kernel.calls >= 2 and kernels._verified["gated_norm"] is True
    assert_close([got], [large.gated_head_norm_ops(*args, 1e-6)], 1e-6, 1e-6)


def test_a_batch_of_prompts_fits_the_gated_norm_grid(stand_in_gated_norm):
    """mlx_lm server's prompt batch: more (sequence, token, head) rows than CUDA's 65,535."""
    kernel = stand_in_gated_norm()
    args = random_norm(5, 2048, 8, 8, mx.float32, False)
    assert_close([large.gated_head_norm(*args, 1e-6)], [large.gated_head_norm_ops(*args, 1e-6)], 1e-6, 1e-6)
    assert kernel.calls >= 3


def test_a_wrong_gated_norm_kernel_warns_and_falls_back(stand_in_gated_norm, monkeypatch):
    kernel = stand_in_gated_norm(wrong=True)
    args = random_norm(1, 2, 2, 16, mx.float32, True)
    with pytest.warns(UserWarning, match="gated_norm kernel is disabled"):
        got = large.gated_head_norm(*args, 1e-6)
    assert_close([got], [large.gated_head_norm_ops(*args, 1e-6)], 0, 0)
    calls = kernel.calls
    large.gated_head_norm(*args, 1e-6)
    monkeypatch.setenv("MLX_XLSTM_KERNELS", "0")
    monkeypatch.setitem(kernels._verified, "gated_norm", True)
    large.gated_head_norm(*args, 1e-6)
    assert kernel.calls == calls


def test_gated_norm_takes_the_ops_path_for_inputs_it_does_not_take(stand_in_gated_norm):
    kernel = stand_in_gated_norm()
    h, qkvo, weight, bias, o_start = random_norm(1, 2, 2, 16, mx.float32, True)
    large.gated_head_norm(h.astype(mx.bfloat16), qkvo, weight, bias, o_start, 1e-6)  # h not fp32
    large.gated_head_norm(h, qkvo.astype(mx.int32), weight, bias, o_start, 1e-6)
    assert kernel.calls == 0


def test_gradients_through_the_gated_norm_kernel_are_the_ops_gradients(stand_in_gated_norm):
    stand_in_gated_norm()
    h, qkvo, weight, bias, o_start = random_norm(2, 2, 2, 16, mx.float32, True)

    def grads(fn):
        f = lambda h, qkvo, weight, bias: (fn(h, qkvo, weight, bias, o_start, 1e-6) ** 2).sum()
        return mx.grad(f, argnums=(0, 1, 2, 3))(h, qkvo, weight, bias)

    for got, want in zip(grads(large.gated_head_norm), grads(large.gated_head_norm_ops)):
        assert mx.allclose(got, want, rtol=1e-5, atol=1e-6).item()


def random_gates(shape, G, K, dtype, key=17):
    """Tokens (shape..., K), fp32 gate weights and biases; some pre-activations past the cap."""
    keys = mx.random.split(mx.random.key(key), 3)
    x = mx.random.normal((*shape, K), key=keys[0]).astype(dtype)
    weight = 4.0 * K**-0.5 * mx.random.normal((G, K), key=keys[1])
    bias = 8.0 * mx.random.normal((G,), key=keys[2])
    return x, weight, bias


@pytest.mark.parametrize("weight_dtype", [mx.float32, mx.bfloat16])  # a folder may hold bf16 gates
def test_the_layer_takes_its_gates_from_the_gate_kernel(stand_in_gates, weight_dtype, monkeypatch):
    kernel = stand_in_gates()
    x, weight, bias = random_gates((2, 3), 8, 40, mx.bfloat16)
    weight, bias = weight.astype(weight_dtype), bias.astype(weight_dtype)
    got = large.head_gates(x, weight, bias, 15.0)
    assert kernel.calls >= 2 and kernels._verified["gates"] is True
    assert [(g.shape, g.dtype) for g in got] == [((2, 3, 4), mx.float32)] * 2
    assert_close(got, large.head_gates_ops(x, weight, bias, 15.0), 1e-6, 1e-6)
    # the layer's tokens as rows, the gates in the batch's (B, T) shape, by the kernel and the ops
    calls = kernel.calls
    rows = large.head_gates(x.reshape(6, 40), weight, bias, 15.0, lead=(2, 3))
    with kernels.without_vjp():  # as the compiled decode step calls it
        bare_rows = large.head_gates(x.reshape(6, 40), weight, bias, 15.0, lead=(2, 3))
    assert kernel.calls >= calls + 2
    monkeypatch.setenv("MLX_XLSTM_KERNELS", "0")
    rows_by_ops = large.head_gates(x.reshape(6, 40), weight, bias, 15.0, lead=(2, 3))
    assert_close(rows, got, 0, 0)
    assert_close(bare_rows, got, 0, 0)
    assert_close(rows_by_ops, got, 1e-6, 1e-6)


def test_the_gates_ops_are_the_models_gate_functions():
    """head_gates_ops: the input gates' capped pre-activations, the forget gates' log-sigmoid."""
    x, weight, bias = random_gates((5,), 6, 24, mx.float32)
    i, log_f = large.head_gates_ops(x, weight, bias, 15.0)
    capped = 15.0 * mx.tanh((x @ weight.T + bias) / 15.0)
    assert_close([i, log_f], [capped[:, :3], ops.nn.log_sigmoid(capped[:, 3:])], 1e-6, 1e-6)
    assert (mx.abs(i) <= 15.0).all().item() and (log_f <= 0).all().item()


def test_a_wrong_gate_kernel_warns_and_falls_back(stand_in_gates, monkeypatch):
    kernel = stand_in_gates(wrong=True)
    x, weight, bias = random_gates((1, 2), 4, 16, mx.float32)
    with pytest.warns(UserWarning, match="gates kernel is disabled"):
        got = large.head_gates(x, weight, bias, 15.0)
    assert_close(got, large.head_gates_ops(x, weight, bias, 15.0), 0, 0)
    calls = kernel.calls
    large.head_gates(x, weight, bias, 15.0)
    monkeypatch.setenv("MLX_XLSTM_KERNELS", "0")
    monkeypatch.setitem(kernels._verified, "gates", True)
    large.head_gates(x, weight, bias, 15.0)
    assert kernel.calls == calls


def test_gates_take_the_ops_path_for_inputs_they_do_not_take(stand_in_gates):
    kernel = stand_in_gates()
    x, weight, bias = random_gates((1, 2), 4, 16, mx.float32)
    large.head_gates(x, weight.astype(mx.int32), bias, 15.0)  # gate weights not floating point
    large.head_gates(x.astype(mx.int32), weight, bias, 15.0)  # tokens of a dtype it does not read
    large.head_gates(x, weight, bias.astype(mx.int32), 15.0)  # nor the biases
    x, weight, bias = random_gates((1, 2), 2 * gates.MAX_ROWS, 16, mx.float32)
    large.head_gates(x, weight, bias, 15.0)  # more rows than a threadgroup's warps
    assert kernel.calls == 0


def test_gradients_through_the_gate_kernel_are_the_ops_gradients(stand_in_gates):
    stand_in_gates()
    x, weight, bias = random_gates((2, 2), 4, 16, mx.float32)

    def grads(fn):
        f = lambda x, weight, bias: sum((y**2).sum() for y in fn(x, weight, bias, 15.0))
        return mx.grad(f, argnums=(0, 1, 2))(x, weight, bias)

    for got, want in zip(grads(large.head_gates), grads(large.head_gates_ops)):
        assert mx.allclose(got, want, rtol=1e-5, atol=1e-6).item()
    as_rows = lambda x, *args: large.head_gates(x.reshape(4, 16), *args, lead=(2, 2))
    for got, want in zip(grads(as_rows), grads(large.head_gates_ops)):
        assert mx.allclose(got, want, rtol=1e-5, atol=1e-6).item()


# ---- the CUDA units kernels/cuda.py compiles, through nvcc / NVRTC (where installed) -----

def cuda_source(dtype, Dqk, Dv, body=None):
    """The translation unit the CUDA step kernel compiles (kernels/cuda.py)."""
    kernel = cuda.Kernel(step.NAME, step.INPUTS, step.OUTPUTS, step.source(CUDA) if body is None else body, runtime=step.RUNTIME)
    layout = [("Q_STRIDE", 8 * Dqk), ("K_STRIDE", 8 * Dqk), ("V_STRIDE", 8 * Dv), ("Q_OFF", 0), ("K_OFF", 0), ("V_OFF", 0)]
    return kernel.source([dtype] * 3 + [mx.float32] * 6, [mx.float32] * 4, [("DQK", Dqk), ("DV", Dv), ("NH", 8), *layout])[1]


def cuda_chunk_states_source(dtype, Dqk, Dv, body=None):
    """The chunk-state kernel's unit: the chunk count is a launch argument, not compiled in."""
    body = chunk_states.source(CUDA) if body is None else body
    kernel = cuda.Kernel(chunk_states.NAME, chunk_states.INPUTS, chunk_states.OUTPUTS, body, runtime=chunk_states.RUNTIME)
    inputs = [mx.float32, mx.float32, dtype] + [mx.float32] * 4
    return kernel.source(inputs, [dtype] + [mx.float32] * 5, [("T", dtype), ("DQK", Dqk), ("DV", Dv)])[1]


def cuda_gated_norm_source(dtype, Dv):
    kernel = cuda.Kernel(gated_norm.NAME, gated_norm.INPUTS, gated_norm.OUTPUTS, gated_norm.source(CUDA))
    constants = [("T", dtype), ("NH", 8), ("DV", Dv), ("TPB", gated_norm.threads(Dv)), ("E", 12 * Dv), ("O_START", 4 * Dv), ("HAS_BIAS", 1)]
    return kernel.source([mx.float32, dtype, dtype, dtype, mx.float32], [dtype], constants)[1]


def cuda_gates_source(dtype, G, body=None, tokens_a_group=1):
    body = gates.source(CUDA) if body is None else body
    kernel = cuda.Kernel(gates.NAME, gates.INPUTS, gates.OUTPUTS, body, runtime=gates.RUNTIME)
    return kernel.source([dtype] + [mx.float32] * 3, [mx.float32] * 2, [("G", G), ("TOK", tokens_a_group)])[1]


def nvcc(source):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cu")
        with open(path, "w") as f:
            f.write(source)
        return subprocess.run(
            ["nvcc", "-std=c++17", "-arch=sm_90", "--ptx", "-o", os.path.join(tmp, "k.ptx"), path],
            capture_output=True,
            text=True,
        )


needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")


def _nvrtc():
    try:
        return cuda.NVRTC()
    except RuntimeError:
        return None


@pytest.mark.skipif(_nvrtc() is None, reason="libnvrtc not found")
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_cuda_units_compile_with_nvrtc_without_headers(dtype):
    nvrtc = _nvrtc()
    units = (cuda_source(dtype, 256, 512), cuda_chunk_states_source(dtype, 256, 512), cuda_gated_norm_source(dtype, 512), cuda_gates_source(dtype, 16),
             cuda_gates_source(dtype, 16, tokens_a_group=gates.TOKENS_A_GROUP))
    for unit in units:
        assert len(nvrtc.compile(unit, "unit", "sm_90", binary=True)) > 0
    broken = cuda_source(dtype, 16, 40, step.source(CUDA).replace("= c[j];", "= c_new[j];"))
    with pytest.raises(RuntimeError, match="c_new"):
        nvrtc.compile(broken, "unit", "sm_90", binary=True)


@needs_nvcc
def test_cuda_step_source_compiles():
    result = nvcc(cuda_source(mx.bfloat16, 256, 512))
    assert result.returncode == 0, result.stderr
    broken = step.source(CUDA).replace("= c[j];", "= c_new[j];")
    assert nvcc(cuda_source(mx.float32, 16, 40, broken)).returncode != 0


@needs_nvcc
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_cuda_gates_source_compiles(dtype):
    for tokens_a_group in (1, gates.TOKENS_A_GROUP):  # a short call's and a prompt's
        result = nvcc(cuda_gates_source(dtype, 16, tokens_a_group=tokens_a_group))
        assert result.returncode == 0, result.stderr
    broken = gates.source(CUDA).replace("const float u = ", "const float uu = ")
    assert nvcc(cuda_gates_source(dtype, 16, broken)).returncode != 0


@needs_nvcc
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_cuda_chunk_states_source_compiles(dtype):
    result = nvcc(cuda_chunk_states_source(dtype, 256, 512))
    assert result.returncode == 0, result.stderr


# ---- parity on the GPU --------------------------------------------------------------------


@pytest.fixture
def first_use_checks(monkeypatch):
    """Forget the first-use checks other tests ran in this process: a test that asserts a check
    passed sees the one its own inputs triggered."""
    for name in kernels._verified:
        monkeypatch.setitem(kernels._verified, name, None)
    monkeypatch.delenv("MLX_XLSTM_KERNELS", raising=False)


@needs_gpu
@pytest.mark.parametrize("B", [1, 3, 16])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("Dqk, Dv", [(256, 512), (12, 40)])
@pytest.mark.parametrize("T", [1, 5])
def test_kernel_matches_ops(B, dtype, Dqk, Dv, T):
    args = random_step(B, 2, Dqk, Dv, dtype, key=B, masked=[0], T=T)
    got = flat(step.launch(step.kernel, *args, 1e-6))
    want = flat(ops.mlstm_step_ops(*args))
    assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the masked sequence keeps its state bit for bit
    assert mx.array_equal(got[1][0], args[5][0]).item() and mx.array_equal(got[3][0], args[7][0]).item()


@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_a_call_of_several_tokens_is_those_steps_one_by_one(dtype):
    """A verify call of k + 1 tokens scores them bit for bit as decoding them one at a time
    does: speculative decoding's greedy output is plain greedy output."""
    q, k, v, i, log_f, C, n, m = random_step(3, 8, 256, 512, dtype, key=21, masked=[1], T=6)
    h_call, state_call = step.launch(step.kernel, q, k, v, i, log_f, C, n, m, 1e-6)
    hs, state = [], (C, n, m)
    for t in range(6):
        h, state = step.launch(step.kernel, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], i[:, t:t + 1], log_f[:, t:t + 1], *state, 1e-6)
        hs.append(h)
    for got, want in zip((h_call, *state_call), (mx.concatenate(hs, axis=1), *state)):
        assert mx.array_equal(got, want).item()


@needs_gpu
def test_kernel_over_many_steps_stays_with_ops(first_use_checks):
    B, H, Dqk, Dv = 2, 8, 256, 512
    _, _, _, _, _, C, n, m = random_step(B, H, Dqk, Dv, mx.float32, key=11)
    state_k = state_o = (C, n, m)
    for t in range(256):
        q, k, v, i, log_f, *_ = random_step(B, H, Dqk, Dv, mx.bfloat16, key=100 + t, masked=[t % 2], T=1 + t % 3)
        h_k, state_k = dispatch_step(q, k, v, i, log_f, *state_k)
        h_o, state_o = ops.mlstm_step_ops(q, k, v, i, log_f, *state_o)
        mx.eval(h_k, state_k, h_o, state_o)
    assert kernels._verified["step"] is True
    assert_close((h_k, *state_k), (h_o, *state_o), rtol=1e-3, atol=1e-4)


@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("B, NC, Dqk, Dv", [(1, 32, 256, 512), (3, 5, 12, 40)])
def test_chunk_state_kernel_matches_ops(dtype, B, NC, Dqk, Dv):
    args = kernels._random_chunk_inputs(B=B, H=2, NC=NC, Dqk=Dqk, Dv=Dv, dtype=dtype)
    (got_in, got_out), (want_in, want_out) = chunk_states.launch(chunk_states.kernel, *args), ops.chunk_states_ops(*args)
    assert got_in[0].dtype == dtype
    assert_close((*got_in[1:], *got_out), (*want_in[1:], *want_out), rtol=1e-4, atol=1e-5)
    # C_in: rounded to bf16 from fp32 values that differ in the last bits: an ulp at most
    assert_close(got_in[:1], want_in[:1], rtol=1e-4 if dtype == mx.float32 else 2**-7, atol=1e-5)


@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("T", [64, 200, 2048])
def test_fused_chunkwise_matches_ops(dtype, T, first_use_checks):
    args = random_prompt(2, 8, T, 256, 512, dtype, key=T, masked_from=T // 3)
    got = flat(dispatch_chunkwise(*args))
    want = flat(ops.mlstm_chunkwise_ops(*args))
    assert kernels._verified["chunk_states"] is True
    assert_close(got[1:], want[1:], rtol=1e-4, atol=1e-5)  # the state: fp32 all the way
    # h: bf16 matmuls round the entering states (C_in) differently by an ulp here and there
    tol = 1e-5 if dtype == mx.float32 else 1e-2
    assert (mx.abs(got[0] - want[0]).max() <= tol * mx.abs(want[0]).max()).item()


@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_generation_through_both_kernels_matches_the_ops_path(monkeypatch, dtype, first_use_checks):
    """mlx-lm's own generate on the demo model: a 300-token prompt (prefill through the
    chunk-state kernel), then greedy decode (fused step): the same tokens as the ops path."""
    from mlx.utils import tree_map
    from mlx_lm import generate, load

    model, tokenizer = load(str(Path(__file__).resolve().parent.parent / "demo" / "xlstm-stdlib"))
    model.update(tree_map(lambda w: w.astype(dtype) if w.dtype == mx.bfloat16 else w, model.parameters()))
    prompt = open(ops.__file__).read()[:1200]
    assert len(tokenizer.encode(prompt)) > 256

    def tokens(kernels_on):
        monkeypatch.setenv("MLX_XLSTM_KERNELS", "1" if kernels_on else "0")
        return tokenizer.encode(generate(model, tokenizer, prompt, max_tokens=48))

    with_kernels, without = tokens(True), tokens(False)
    assert kernels._verified["step"] is True and kernels._verified["chunk_states"] is True
    assert kernels._verified["gated_norm"] is True and kernels._verified["gates"] is True
    same = sum(a == b for a, b in zip(with_kernels, without)) / max(len(with_kernels), len(without))
    # fp32: identical; bf16: rounding may flip a near-tie late in the text, never the start
    assert same == 1.0 if dtype == mx.float32 else (with_kernels[:16] == without[:16] and same > 0.5), same


@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("B, T, H, Dv", [(1, 1, 8, 512), (16, 1, 8, 512), (2, 70, 4, 40), (1, 3, 2, 300), (5, 2048, 8, 32)])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_norm_kernel_matches_ops(dtype, B, T, H, Dv, bias):
    h, qkvo, weight, b, o_start = random_norm(B, T, H, Dv, dtype, bias, key=B + T)
    got = gated_norm.launch(gated_norm.kernel, h, qkvo, weight, b, o_start, 1e-6)
    want = large.gated_head_norm_ops(h, qkvo, weight, b, o_start, 1e-6)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape == (B, T, H * Dv)
    # fp32: to rounding; bf16/fp16: the ops round twice (after the weight, after the gate), the kernel once
    ulp = {mx.float32: 1e-5, mx.bfloat16: 2**-7, mx.float16: 2**-10}[dtype]
    err = mx.abs(got.astype(mx.float32) - want.astype(mx.float32))
    assert (err <= 2 * ulp * (1 + mx.abs(want.astype(mx.float32)))).all().item(), err.max().item()


@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("shape, G, K", [((1, 1), 16, 4096), ((16, 1), 16, 4096), ((1, 2048), 16, 4096), ((3, 5), 6, 72), ((2,), 32, 100)])
def test_gate_kernel_matches_ops(dtype, shape, G, K):
    x, weight, bias = random_gates(shape, G, K, dtype, key=K + G)
    if dtype == mx.bfloat16:  # bf16 gate weights, as the demo folder has them
        weight, bias = weight.astype(dtype), bias.astype(dtype)
    got = gates.launch(gates.kernel, x, weight, bias, 15.0)
    want = large.head_gates_ops(x, weight, bias, 15.0)
    assert [g.shape for g in got] == [w.shape for w in want] == [(*shape, G // 2)] * 2
    assert_close(got, want, 1e-4, 1e-5)


@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("B, T", [(1, 1), (16, 1), (2, 5)])
def test_packed_step_kernel_matches_ops(dtype, B, T):
    args, packed = packed_step(B, T, 8, 256, 512, dtype, key=B + T)
    got = kernels.mlstm_step_kernel(*args, packed=packed)
    assert_close(flat(got), flat(ops.mlstm_step_ops(*args)), 1e-4, 1e-4)
