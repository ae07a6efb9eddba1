"""Logits equal transformers' xLSTMForCausalLM in fp32 (NX-AI's tolerance: atol 1e-4, rtol 1e-3)."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import load_fixture, needs_torch
from helpers import fixtures

ATOL, RTOL = 1e-4, 1e-3


@pytest.mark.parametrize("name", list(fixtures.CONFIGS))
def test_golden_logits(name):
    model = load_fixture(name)
    golden = np.load(fixtures.FIXTURES / name / "golden.npz")
    for T in fixtures.LENGTHS:
        ids = golden["ids"][:, :T]
        out = np.array(model(mx.array(ids)))
        np.testing.assert_allclose(out, golden["logits"][:, :T], atol=ATOL, rtol=RTOL, err_msg=f"{name} T={T}")


LIVE = {
    "single_chunk8": dict(hidden_size=32, num_heads=2, chunk_size=8),
    "fused_bias_3heads": dict(hidden_size=48, num_heads=3, chunk_size=16, weight_mode="fused", use_bias=True),
    "tied_one_head": dict(hidden_size=32, num_heads=1, chunk_size=32, tie_word_embeddings=True),
    "three_blocks_qk1": dict(hidden_size=32, num_heads=4, num_hidden_layers=3, chunk_size=64, qk_dim_factor=1.0),
}


@needs_torch
@pytest.mark.parametrize("name", list(LIVE))
def test_live_logits(name, tmp_path):
    """Each length runs the reference's own path: step (T=1), step loop (T < chunk), chunks + rest."""
    from mlx_lm.utils import load_model

    ref = fixtures.save_reference(tmp_path, seed=7, tokenizer=False, **LIVE[name])
    model, _ = load_model(tmp_path)
    rng = np.random.default_rng(1)
    chunk = LIVE[name]["chunk_size"]
    for T in sorted({1, 3, chunk - 1, chunk, chunk + 1, 2 * chunk + 5, 257}):
        ids = rng.integers(0, fixtures.VOCAB, size=(2, T))
        out = np.array(model(mx.array(ids)))
        np.testing.assert_allclose(
            out, fixtures.reference_logits(ref, ids), atol=ATOL, rtol=RTOL, err_msg=f"{name} T={T}"
        )


def test_bf16_chunkwise_stays_within_bf16_rounding_of_the_fp32_step_loop():
    """A bf16 model's prefill runs bf16 matmuls (fp32 gates and state): against the exact
    token-by-token recurrence on the same inputs it must differ by rounding only."""
    import mlx.nn as nn

    from mlx_lm_xlstm import mlstm as ops

    B, H, T, Dqk, Dv = 2, 4, 300, 32, 64
    keys = mx.random.split(mx.random.key(0), 5)
    q, k = (mx.random.normal((B, H, T, Dqk), key=keys[j]).astype(mx.bfloat16) for j in (0, 1))
    v = mx.random.normal((B, H, T, Dv), key=keys[2]).astype(mx.bfloat16)
    i = mx.random.normal((B, H, T), key=keys[3]) - 2  # gates as a trained model has them
    log_f = nn.log_sigmoid(4 + mx.random.normal((B, H, T), key=keys[4]))
    state = (mx.zeros((B, H, Dqk, Dv)), mx.zeros((B, H, Dqk)), mx.zeros((B, H)))

    h, (C, n, m) = ops.mlstm_chunkwise_ops(q, k, v, i, log_f, *state)
    steps = lambda x: x.swapaxes(1, 2)  # the recurrent form takes (B, T, H, ...)
    h_loop, s = ops.mlstm_step_ops(*map(steps, (q, k, v, i, log_f)), *state)
    h_loop = steps(h_loop)
    rel = lambda got, want: (mx.abs(got - want).max() / mx.abs(want).max()).item()
    assert h.dtype == C.dtype == mx.float32
    assert rel(h, h_loop) < 3e-2 and (mx.abs(h - h_loop).mean() / mx.abs(h_loop).mean()).item() < 1e-2
    assert rel(C, s[0]) < 1e-2 and rel(n, s[1]) < 1e-5 and mx.abs(m - s[2]).max().item() < 1e-5
