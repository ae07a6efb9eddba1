"""The CUDA kernels run on the CPU (tests/helpers/cuda_emulator.py: the unit the GPU compiles,
one CPU thread per GPU thread) against the pure-MLX functions they replace: their logic is
tested on every machine, not only on a GPU. The Metal twins share the bodies (linted in
test_metal_lint.py)."""

import mlx.core as mx
import numpy as np
import pytest
from helpers.cuda_emulator import EmulatedKernel, emulated

from mlx_lm_xlstm import kernels, large
from mlx_lm_xlstm import mlstm as ops
from mlx_lm_xlstm.kernels import chunk_states, gated_norm, gates, step
from mlx_lm_xlstm.kernels.spelling import CUDA

CHECKS = {
    "step": (step, kernels._step_matches_ops),
    "chunk_states": (chunk_states, kernels._chunk_states_match_ops),
    "gated_norm": (gated_norm, kernels._gated_norm_matches_ops),
    "gates": (gates, kernels._gates_match_ops),
}


@pytest.mark.parametrize("name", CHECKS)
def test_the_cuda_kernel_passes_its_first_use_check_on_the_cpu(name, monkeypatch):
    """The comparison a GPU runs on first use (fp32 and bf16, masked steps, q, k, v in place)."""
    module, check = CHECKS[name]
    monkeypatch.setattr(module, "kernel", emulated(module))
    assert check()


def test_the_step_kernel_at_a_wide_head_matches_the_ops():
    """xLSTM-7b's Dqk = 256 (16 rows of C a thread) and three tokens a call, read in place."""
    q, k, v, i, log_f, C, n, m = kernels._random_step_inputs(B=1, T=3, H=1, Dqk=256, Dv=64, dtype=mx.bfloat16)
    qkv = mx.concatenate([x.reshape(3, -1) for x in (q, k, v)], axis=-1)
    h, (C2, n2, m2) = step.launch(emulated(step), None, None, None, i, log_f, C, n, m, 1e-6, packed=(qkv, (0, 256, 512)))
    want_h, (want_C, want_n, want_m) = ops.mlstm_step_ops(q, k, v, i, log_f, C, n, m)
    for got, want in zip((h, C2, n2, m2), (want_h, want_C, want_n, want_m)):
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "Dqk, Dv, T",
    [
        (40, 40, 17),  # rows that do not fill every thread's last slot; a verify call's 17 tokens
        (600, 32, 2),  # more slots a thread than lanes: a lane keeps n of two rows
    ],
)
def test_the_step_kernel_matches_the_ops_at_uneven_heads_and_many_tokens(Dqk, Dv, T):
    """The partial sums' two buffers over many tokens, and the rows of n each lane keeps."""
    args = kernels._random_step_inputs(B=2, T=T, H=2, Dqk=Dqk, Dv=Dv, dtype=mx.float32)
    h, state = step.launch(emulated(step), *args, 1e-6)
    want_h, want_state = ops.mlstm_step_ops(*args)
    for got, want in zip((h, *state), (want_h, *want_state)):
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-5)


def test_a_prompts_gate_groups_give_the_one_token_threadgroups_numbers(monkeypatch):
    """Threadgroups of eight tokens (a prompt's call) sum each token's products in the order
    a threadgroup of one does: the same gates, bit for bit, a part-full last group too."""
    x, weight, bias = kernels._random_gate_inputs(M=gates.GROUPED_FROM + 3, G=6, K=300, dtype=mx.bfloat16)
    kernel = emulated(gates)
    grouped = gates.launch(kernel, x, weight, bias, 15.0)
    monkeypatch.setattr(gates, "GROUPED_FROM", 10**9)  # every call one token a threadgroup
    alone = gates.launch(kernel, x, weight, bias, 15.0)
    for a, b in zip(grouped, alone):
        assert mx.array_equal(a, b).item()


def test_chunk_states_loaded_ahead_are_the_chunk_by_chunk_walk(monkeypatch):
    """Chunks loaded AHEAD at a time (the last block part full) walk the same arithmetic as one
    chunk at a time: the same states, bit for bit, and the ops' to their tolerance."""
    args = kernels._random_chunk_inputs(NC=2 * chunk_states.AHEAD + 5, dtype=mx.bfloat16)
    ahead = chunk_states.launch(emulated(chunk_states), *args)
    monkeypatch.setattr(chunk_states, "AHEAD", 1)
    one_by_one = chunk_states.launch(emulated(chunk_states), *args)
    (want_in, want_out) = ops.chunk_states_ops(*args)
    for got, alone, want in zip((*ahead[0], *ahead[1]), (*one_by_one[0], *one_by_one[1]), (*want_in, *want_out)):
        assert mx.array_equal(got, alone).item()
        rtol = 1e-4 if got.dtype == mx.float32 else 1e-2
        np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)), rtol=rtol, atol=1e-4)


def test_the_gated_norm_kernel_matches_the_ops_at_a_batch_of_tokens():
    h, qkvo, weight, bias, o_start = kernels._random_norm_inputs(B=3, T=5, H=2, Dv=128, bias=False)
    got = gated_norm.launch(emulated(gated_norm), h, qkvo, weight, None, o_start, 1e-6)
    want = large.gated_head_norm_ops(h, qkvo, weight, None, o_start, 1e-6)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-5)


def broken(module, before: str, after: str) -> EmulatedKernel:
    body = module.source(CUDA)
    assert before in body
    return emulated(module, body.replace(before, after, 1))


@pytest.mark.parametrize(
    "name, before, after",
    [
        ("step", "num_part[buf][y][x] = num;", "num_part[buf][y][x] = num * (y == 0);"),  # a lost partial sum
        ("step", "h[at * DV + d] = total", "h[at * DV + d] = q_n"),  # the wrong readout
        ("chunk_states", "m_run = m_next;", ""),  # the stabiliser never moves
        ("gated_norm", "x[j] - mean", "x[j]"),  # not centred
        ("gates", "for (unsigned int lanes = 16; lanes > 0; lanes /= 2)", "for (unsigned int lanes = 8; lanes > 0; lanes /= 2)"),
    ],
)
def test_the_emulation_catches_a_broken_kernel(name, before, after, monkeypatch):
    module, check = CHECKS[name]
    monkeypatch.setattr(module, "kernel", broken(module, before, after))
    assert not check()


def test_the_emulation_catches_a_write_out_of_bounds():
    """A kernel that writes past its output fails at the launch, not later in the heap."""
    kernel = broken(gates, "i_out[token * (G / 2) + row] = g;", "i_out[token * (G / 2) + row + 1000] = g;")
    x, w, b = kernels._random_gate_inputs(M=3, G=6, K=72)
    with pytest.raises(AssertionError, match="wrote outside output 0"):
        gates.launch(kernel, x, w, b, 15.0)
