"""The one mLSTM entry point (`mlstm_update`) and the compiled decode step, for both
architectures: the same results as the plain reference path (MLX_XLSTM_KERNELS=0), a
bounded number of compile traces, and the errors of an empty prompt."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import load_fixture

from mlx_lm_xlstm import mlstm

ATOL, RTOL = 1e-4, 1e-3


def random_cell_inputs(B, T, H, Dqk, Dv, key):
    keys = mx.random.split(mx.random.key(key), 5)
    q, k = (mx.random.normal((B, T, H, Dqk), key=keys[j]) for j in (0, 1))
    v = mx.random.normal((B, T, H, Dv), key=keys[2])
    i = 2 * mx.random.normal((B, T, H), key=keys[3])
    f = 3 + mx.random.normal((B, T, H), key=keys[4])
    return q, k, v, i, f


def reference(q, k, v, i, f, mask, chunk_size):
    """The whole prompt in one pass of the reference chunkwise form."""
    import mlx.nn as nn

    log_f = nn.log_sigmoid(f)
    if mask is not None:
        i = mx.where(mask[..., None], i, mlstm.MASKED_I)
        log_f = mx.where(mask[..., None], log_f, 0.0)
    B, T, H, Dqk = q.shape
    zeros = (mx.zeros((B, H, Dqk, v.shape[-1])), mx.zeros((B, H, Dqk)), mx.zeros((B, H)))
    t = lambda x: x.swapaxes(1, 2)
    h, state = mlstm.mlstm_chunkwise_ops(t(q), t(k), t(v), t(i), t(log_f), *zeros, chunk_size=chunk_size)
    return t(h), state


@pytest.mark.parametrize("T", [2, 7, 16, 63, 64, 65, 150, 333])
def test_pieces_give_the_one_pass_result(T):
    q, k, v, i, f = random_cell_inputs(2, T, 2, 8, 12, key=T)
    mask = mx.arange(T)[None] < mx.array([[T], [max(1, T - 5)]])  # a right-padded row
    want_h, want_state = reference(q, k, v, i, f, mask, chunk_size=16)
    got_h, got_state = mlstm.mlstm_update(q, k, v, i, mlstm.log_sigmoid(f), None, mask, chunk_size=16, max_piece=64)
    assert got_h.shape == want_h.shape
    for got, want in zip((got_h, *got_state), (want_h, *want_state)):
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5, rtol=1e-4)


def test_pieces_are_few_shapes_of_whole_chunks():
    shapes = set()
    for T in range(1, 2000, 7):
        pieces = mlstm.pieces(T, 64, 1024)
        assert sum(n for n, _ in pieces) == T
        assert all(padded >= n and (n % 64 == 0 or n == pieces[-1][0]) for n, padded in pieces)
        # padding: below a chunk up to a power of two, above it at most 1/8 of the piece
        assert all(padded - n <= padded // 8 or padded <= 64 for n, padded in pieces)
        shapes.update(padded for _, padded in pieces)
    assert shapes <= {8, 16, 32, 64, 128, 256, 512, 1024}
    # mlx-lm's prefill steps: 2048 tokens, then the rest but the last token
    assert mlstm.pieces(2048, 64, 16384) == [(2048, 2048)] and mlstm.pieces(2047, 64, 16384) == [(2047, 2048)]
    assert mlstm.pieces(1500, 64, 16384) == [(1024, 1024), (476, 512)]
    assert mlstm.pieces(1700, 64, 16384) == [(1024, 1024), (512, 512), (128, 128), (36, 64)]


def test_ten_prompt_lengths_trace_the_chunkwise_form_a_few_times(monkeypatch):
    """mx.compile traces once per input shape: without pieces every prompt length would retrace."""
    traces = []

    def counted(*args, **kwargs):
        traces.append(args[0].shape)
        return mlstm.mlstm_chunkwise_ops(*args, **kwargs)

    monkeypatch.setattr(mlstm, "_compiled_chunkwise", mx.compile(counted))
    monkeypatch.delenv("MLX_XLSTM_KERNELS", raising=False)
    model = load_fixture("single")
    lengths = [70, 75, 90, 100, 111, 120, 127, 99, 81, 77]
    for T in lengths:
        model(mx.array(np.random.default_rng(T).integers(0, 300, (1, T))))
    # one 64-token piece and one short power of two per length: at most 1 + 4 shapes
    assert len(set(traces)) == len(traces) <= 5


@pytest.fixture
def decode_traces(monkeypatch):
    """The (batch, tokens) shapes the compiled decode step is traced for (its Python runs
    only when mx.compile traces it)."""
    from mlx_lm_xlstm import recurrent

    traces = []
    forward_states = recurrent.forward_states

    def counted(model, inputs, states, mask=None):
        traces.append(inputs.shape)
        return forward_states(model, inputs, states, mask)

    monkeypatch.setattr(recurrent, "forward_states", counted)
    monkeypatch.delenv("MLX_XLSTM_KERNELS", raising=False)
    return traces


def test_the_decode_step_is_traced_once_per_batch_size(decode_traces, model_folder):
    """mlx-lm's BatchGenerator shrinks the batch as requests finish: one trace for each size
    it reaches, none on a second call; one sequence, one trace (the prompt's last token comes
    as int32, sampled ones as uint32: the step takes both as one dtype)."""
    from mlx_lm import batch_generate, load, stream_generate

    model, tokenizer = load(str(model_folder))
    prompts = [tokenizer.encode("def f" + "x" * n) for n in (3, 9, 20, 40, 70, 5)]
    batch_generate(model, tokenizer, prompts, max_tokens=[8, 16, 24, 12, 30, 4])
    assert decode_traces == [(B, 1) for B in range(6, 0, -1)]
    batch_generate(model, tokenizer, prompts, max_tokens=[4, 6, 8, 10, 12, 3])
    assert len(decode_traces) == 6
    model.decode_step = type(model.decode_step)()
    list(stream_generate(model, tokenizer, prompts[4], max_tokens=12))
    assert decode_traces[6:] == [(1, 1)]


def test_compiled_decode_on_the_paper_stack_equals_the_plain_path(monkeypatch):
    """Greedy decode of a mixed sLSTM/mLSTM stack, batch of 2 with the mask mlx-lm's
    BatchGenerator keeps (left_padding of zeros): compiled and plain give the same logits."""
    from mlx_lm.models.cache import ArraysCache

    model = load_fixture("paper_mixed")

    def decode(masked: bool):
        cache = model.make_cache()
        if masked:
            cache = [ArraysCache.merge([c, type(c)(len(c.cache))]) for c in cache]
            prompt = mx.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
        else:
            prompt = mx.array([[1, 2, 3, 4, 5]])
        logits = [model(prompt, cache=cache)[:, -1]]
        for _ in range(10):
            logits.append(model(mx.argmax(logits[-1], axis=-1)[:, None], cache=cache)[:, -1])
        return mx.stack(logits, axis=1)

    monkeypatch.delenv("MLX_XLSTM_KERNELS", raising=False)
    fast = [decode(False), decode(True)]
    assert model.decode_step.fn is not None
    monkeypatch.setenv("MLX_XLSTM_KERNELS", "0")
    for got, want in zip(fast, [decode(False), decode(True)]):
        np.testing.assert_allclose(np.array(got), np.array(want), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", ["single", "paper_mixed"])
def test_an_empty_prompt_is_refused(name):
    model = load_fixture(name)
    for cache in (None, model.make_cache()):
        with pytest.raises(ValueError, match="prompt is empty"):
            model(mx.zeros((1, 0), mx.int32), cache=cache)
