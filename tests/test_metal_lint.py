"""Lint the Metal kernels on Linux: no Metal compiler here, so read the exact source MLX
generates (a custom kernel called inside `mx.export_function` prints it when verbose) and
run it through `g++ -fsyntax-only` against tests/metal_shim.h. Catches syntax and type
errors (undeclared names, wrong qualifiers on the C++ side, missing semicolons), not
Metal-only rules."""

import os
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_lm_xlstm.kernels import chunk_states, gated_norm, gates, metal, step
from mlx_lm_xlstm.kernels.spelling import METAL

SHIM = Path(__file__).with_name("metal_shim.h")


def generated_metal_source(kernel_call, *args) -> str:
    """The Metal source MLX builds for the kernel that `kernel_call(*args)` launches."""
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile("w+") as captured:
        # MLX prints from C++ to fd 1, so capture the descriptor, not sys.stdout.
        saved = os.dup(1)
        os.dup2(captured.fileno(), 1)
        try:
            mx.export_function(os.path.join(tmp, "k.mlxfn"), kernel_call, *args)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        captured.seek(0)
        text = captured.read()
    if "```" not in text:
        raise AssertionError(f"MLX printed no generated source:\n{text}")
    return text.split("```")[1]


def lint(metal_source: str) -> subprocess.CompletedProcess:
    with tempfile.NamedTemporaryFile("w", suffix=".cpp", delete=False) as f:
        f.write(f'#include "{SHIM}"\n{metal_source}')
    try:
        return subprocess.run(
            ["g++", "-std=c++17", "-fsyntax-only", "-Wno-attributes", "-x", "c++", f.name],
            capture_output=True,
            text=True,
        )
    finally:
        os.unlink(f.name)


def zeros(shape, dtype=mx.float32):
    """Row-contiguous zeros, as the arrays a model feeds (MLX names a kernel by its inputs'
    layout too; mx.zeros is a broadcast)."""
    return mx.array(np.zeros(shape, np.float32)).astype(dtype)


def _zero_state(B, H, Dqk, Dv):
    """C, n, m: fp32 whatever the inputs' dtype."""
    return zeros((B, H, Dqk, Dv)), zeros((B, H, Dqk)), zeros((B, H))


def _step_source(body, dtype, Dqk, Dv, B=2, H=2, packed=False, T=3):
    kernel = metal.Kernel(step.NAME, step.INPUTS, step.OUTPUTS, body, runtime=step.RUNTIME)

    def call(q, k, v, i, log_f, C, n, m):
        # packed: q, k, v read in place from one (B * T, E) array (xLSTM-7b's fused projection)
        qkv = mx.concatenate([x.reshape(B * T, -1) for x in (q, k, v)], axis=-1) if packed else None
        layout = (qkv, (0, H * Dqk, 2 * H * Dqk)) if packed else None
        h, (C, n, m) = step.launch(kernel, q, k, v, i, log_f, C, n, m, 1e-6, packed=layout, verbose=True)
        return h, C, n, m

    q, k, v = (zeros((B, T, H, D), dtype) for D in (Dqk, Dqk, Dv))
    i, log_f = zeros((B, T, H)), zeros((B, T, H))
    return generated_metal_source(call, q, k, v, i, log_f, *_zero_state(B, H, Dqk, Dv))


@pytest.mark.parametrize(
    "dtype, Dqk, Dv",
    [(mx.float32, 256, 512), (mx.bfloat16, 256, 512), (mx.float16, 12, 40)],
)
def test_step_kernel_passes_lint(dtype, Dqk, Dv):
    source = _step_source(step.source(METAL), dtype, Dqk, Dv)
    assert "threadgroup_barrier" in source and f"<{Dqk}, {Dv}, 2, {2 * Dqk}, {2 * Dqk}, {2 * Dv}, 0, 0, 0>" in source
    result = lint(source)
    assert result.returncode == 0, result.stderr


def test_packed_step_kernel_passes_lint():
    source = _step_source(step.source(METAL), mx.bfloat16, 256, 512, packed=True)
    assert "<256, 512, 2, 2048, 2048, 2048, 0, 512, 1024>" in source
    result = lint(source)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "breakage",
    [
        ("num += q_a * c[j];", "num += q_a * c[j]"),  # missing semicolon
        ("= c[j];", "= c_new[j];"),  # undeclared name
        ("const float v_d = ", "const float* v_d = "),  # type error
        ("metal::exp(-m_new)", "metal::expo(-m_new)"),  # no such built-in
    ],
)
def test_lint_catches_a_broken_kernel(breakage):
    before, after = breakage
    body = step.source(METAL)
    assert before in body
    result = lint(_step_source(body.replace(before, after, 1), mx.float32, 16, 32))
    assert result.returncode != 0
    assert "error" in result.stderr


def _chunk_states_source(body, dtype, NC, Dqk, Dv, B=2, H=2):
    kernel = metal.Kernel(chunk_states.NAME, chunk_states.INPUTS, chunk_states.OUTPUTS, body, runtime=chunk_states.RUNTIME)

    def call(g, a_max, dC, dn, C, n, m):
        (C_in, n_in, m_in), (C, n, m) = chunk_states.launch(kernel, g, a_max, dC, dn, C, n, m, verbose=True)
        return C_in, n_in, m_in, C, n, m

    g, a_max = zeros((B, H, NC)), zeros((B, H, NC))
    dC, dn = zeros((B, H, NC, Dqk, Dv), dtype), zeros((B, H, NC, Dqk))
    return generated_metal_source(call, g, a_max, dC, dn, *_zero_state(B, H, Dqk, Dv))


@pytest.mark.parametrize(
    "dtype, NC, Dqk, Dv",
    [(mx.float32, 32, 256, 512), (mx.bfloat16, 32, 256, 512), (mx.float16, 3, 12, 40)],
)
def test_chunk_states_kernel_passes_lint(dtype, NC, Dqk, Dv):
    source = _chunk_states_source(chunk_states.source(METAL), dtype, NC, Dqk, Dv)
    assert "static_cast<T>" in source and f", {Dqk}, {Dv}>" in source
    result = lint(source)
    assert result.returncode == 0, result.stderr


def test_one_metal_library_serves_every_length():
    """The chunk count and a call's token count are read at launch: a new prompt length or
    verify length builds no new library (MLX builds one per source, template and input
    layout; inputs of at most 8 values go to constant memory, another layout, so the
    lengths here keep every input above that)."""
    step_sources = {_step_source(step.source(METAL), mx.bfloat16, 16, 32, T=T) for T in (3, 5, 17)}
    assert len(step_sources) == 1
    chunk_sources = {_chunk_states_source(chunk_states.source(METAL), mx.bfloat16, NC, 16, 32) for NC in (4, 8, 32)}
    assert len(chunk_sources) == 1 and "runtime_sizes[0]" in chunk_sources.pop()


def test_lint_catches_a_broken_chunk_states_kernel():
    body = chunk_states.source(METAL).replace("m_run = m_next;", "m_run = m_nxt;")
    result = lint(_chunk_states_source(body, mx.float32, 4, 8, 16))
    assert result.returncode != 0 and "m_nxt" in result.stderr


def _gated_norm_source(body, dtype, Dv, bias):
    kernel = metal.Kernel(gated_norm.NAME, gated_norm.INPUTS, gated_norm.OUTPUTS, body)
    H = 2
    call = lambda h, qkvo, w, b: gated_norm.launch(kernel, h, qkvo, w, b if bias else None, 2 * H * Dv, 1e-6, verbose=True)
    h, qkvo = zeros((2, 3, H, Dv)), zeros((2, 3, 3 * H * Dv), dtype)
    return generated_metal_source(call, h, qkvo, 1 + zeros((H * Dv,), dtype), zeros((H * Dv,), dtype))


@pytest.mark.parametrize("dtype, Dv, bias", [(mx.bfloat16, 512, False), (mx.float32, 40, True), (mx.float16, 300, True)])
def test_gated_norm_kernel_passes_lint(dtype, Dv, bias):
    source = _gated_norm_source(gated_norm.source(METAL), dtype, Dv, bias)
    assert "simd_shuffle_xor" in source and "static_cast<T>" in source
    result = lint(source)
    assert result.returncode == 0, result.stderr


def test_lint_catches_a_broken_gated_norm_kernel():
    body = gated_norm.source(METAL).replace("mean /= DV;", "mean /= DVV;")
    result = lint(_gated_norm_source(body, mx.float32, 40, True))
    assert result.returncode != 0 and "DVV" in result.stderr


def _gates_source(body, dtype, G, tokens=6):
    kernel = metal.Kernel(gates.NAME, gates.INPUTS, gates.OUTPUTS, body, runtime=gates.RUNTIME)
    call = lambda x, w, b: list(gates.launch(kernel, x, w, b, 15.0, verbose=True))
    return generated_metal_source(call, zeros((tokens, 40), dtype), zeros((G, 40)), zeros((G,)))


# a short call's threadgroups (a token each) and a prompt's (TOKENS_A_GROUP each)
@pytest.mark.parametrize("dtype, G, tokens", [(mx.bfloat16, 16, 6), (mx.float32, 6, 6), (mx.float16, 32, 6), (mx.bfloat16, 16, gates.GROUPED_FROM)])
def test_gates_kernel_passes_lint(dtype, G, tokens):
    source = _gates_source(gates.source(METAL), dtype, G, tokens)
    assert f"<{G}, {gates.TOKENS_A_GROUP if tokens >= gates.GROUPED_FROM else 1}>;" in source  # the instance: G, TOK
    assert "simd_shuffle_xor" in source and "metal::precise::tanh" in source
    result = lint(source)
    assert result.returncode == 0, result.stderr


def test_lint_catches_a_broken_gates_kernel():
    body = gates.source(METAL).replace("const float u = ", "const float uu = ")
    result = lint(_gates_source(body, mx.float32, 6))
    assert result.returncode != 0 and "error" in result.stderr
