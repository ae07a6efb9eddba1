"""State semantics: chunked prefill + decode == one pass; ragged batches == one by one."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import load_fixture
from helpers import fixtures
from mlx_lm.models.cache import ArraysCache

ATOL, RTOL = 1e-4, 1e-3


def run_pieces(model, ids, pieces):
    cache = model.make_cache()
    outs, start = [], 0
    for size in pieces:
        outs.append(model(ids[:, start : start + size], cache=cache))
        start += size
    return mx.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("name", ["single", "fused_bias"])
@pytest.mark.parametrize("pieces", [[40, 1, 1, 1], [7, 16, 1, 3, 13], [1] * 12, [16, 16, 8]])
def test_chunked_prefill_and_decode_equal_one_pass(name, pieces):
    model = load_fixture(name)
    ids = mx.array(np.random.default_rng(0).integers(0, fixtures.VOCAB, (2, sum(pieces))))
    full = model(ids)
    chunked, cache = run_pieces(model, ids, pieces)
    np.testing.assert_allclose(np.array(chunked), np.array(full), atol=ATOL, rtol=RTOL)
    C, n, m = cache[0].cache
    assert C.dtype == n.dtype == m.dtype == mx.float32
    assert m.shape == C.shape[:2] and n.shape == C.shape[:3]


def test_state_is_fp32_and_constant_size_with_half_weights():
    model = load_fixture("single")
    model.set_dtype(mx.float16)
    sizes = []
    for T in (8, 100):
        cache = model.make_cache()
        out = model(mx.zeros((1, T), dtype=mx.int32), cache=cache)
        assert out.dtype == mx.float16 and not mx.isnan(out).any().item()
        assert all(c.dtype == mx.float32 for c in cache[0].cache)
        sizes.append(sum(x.nbytes for c in cache for x in c.cache))  # c.nbytes adds the undo window
    assert sizes[0] == sizes[1]


def test_ragged_right_padded_batch_equals_each_alone():
    model = load_fixture("fused_bias")
    rng = np.random.default_rng(3)
    lengths = [5, 23, 17]
    T = max(lengths)
    seqs = [rng.integers(2, fixtures.VOCAB, n) for n in lengths]
    padded = mx.array(np.stack([np.pad(s, (0, T - len(s)), constant_values=1) for s in seqs]))

    cache = model.make_cache()
    for c in cache:
        c.prepare(lengths=lengths)
    batch_logits = model(padded, cache=cache)
    for c in cache:
        c.finalize()
    nxt = mx.array([[7], [8], [9]])
    batch_next = model(nxt, cache=cache)

    for b, s in enumerate(seqs):
        alone_cache = model.make_cache()
        alone = model(mx.array(s)[None], cache=alone_cache)
        np.testing.assert_allclose(
            np.array(batch_logits[b, : lengths[b]]), np.array(alone[0]), atol=ATOL, rtol=RTOL
        )
        alone_next = model(nxt[b : b + 1], cache=alone_cache)
        np.testing.assert_allclose(np.array(batch_next[b]), np.array(alone_next[0]), atol=ATOL, rtol=RTOL)


def test_a_batch_of_new_sequences_runs_unmasked_and_equals_each_alone():
    """mlx-lm's BatchGenerator merges new caches: equal-length prompts then run with no mask
    (the mask-free compiled step), and the batch keeps its size through extend and filter."""
    from mlx_lm.generate import _extend_cache, _merge_caches

    model = load_fixture("fused_bias")
    rng = np.random.default_rng(4)
    prompts = mx.array(rng.integers(2, fixtures.VOCAB, (3, 9)))
    batch = _merge_caches([model.make_cache() for _ in range(3)])
    assert batch[0].make_mask(9) is None and batch[0].batch_size == 3
    logits = [model(prompts, cache=batch)[:, -1:]]
    batch = _extend_cache(batch, _merge_caches([model.make_cache()]))  # a new request joins
    assert batch[0].batch_size == 4 and batch[0].cache[0].shape[0] == 4
    waiting = _extend_cache(_merge_caches([model.make_cache()] * 2), batch)  # new ones, then these
    assert waiting[0].batch_size == 6 and waiting[0].cache[0].shape[0] == 6
    for c in batch:
        c.filter([0, 1, 2])
    for t in range(3):
        assert batch[0].make_mask(1) is None
        logits.append(model(mx.array([[t + 2], [t + 3], [t + 4]]), cache=batch))
    for b in range(3):
        cache = model.make_cache()
        alone = [model(prompts[b : b + 1], cache=cache)[:, -1:]]
        alone += [model(mx.array([[t + 2 + b]]), cache=cache) for t in range(3)]
        np.testing.assert_allclose(
            np.array(mx.concatenate([x[b : b + 1] for x in logits], axis=1)),
            np.array(mx.concatenate(alone, axis=1)), atol=ATOL, rtol=RTOL,
        )


def test_zero_filled_merge_slot_is_the_initial_state():
    """mlx-lm merges caches by filling empty slots with zeros: that must equal a fresh start."""
    model = load_fixture("single")
    ids = mx.array([[5, 6, 7, 8]])
    warm = model.make_cache()
    model(mx.array([[9, 10, 11]]), cache=warm)
    merged = [ArraysCache.merge([w, ArraysCache(3)]) for w in warm]
    out = model(mx.concatenate([mx.array([[1, 2, 3, 4]]), ids]), cache=merged)
    np.testing.assert_allclose(np.array(out[1]), np.array(model(ids)[0]), atol=ATOL, rtol=RTOL)


def test_long_input_runs_in_bounded_pieces_with_the_same_result():
    """A whole-sequence call longer than max_inference_chunksize is cut into pieces."""
    from mlx_lm.utils import load_model

    piecewise, _ = load_model(fixtures.FIXTURES / "single", model_config={"max_inference_chunksize": 48})
    ids = mx.array(np.random.default_rng(5).integers(0, fixtures.VOCAB, (2, 130)))
    np.testing.assert_allclose(np.array(piecewise(ids)), np.array(load_fixture("single")(ids)), atol=ATOL, rtol=RTOL)


def test_compiled_decode_equals_the_plain_ops_path(monkeypatch):
    """Decode steps run as one compiled function; MLX_XLSTM_KERNELS=0 runs the plain ops."""
    import copy

    import mlx.nn as nn

    def decode(model):
        cache = model.make_cache()
        model(mx.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]), cache=cache)
        return mx.concatenate([model(mx.array([[t], [t + 4]]), cache=cache) for t in range(12)], axis=1)

    model = load_fixture("fused_bias")
    compiled = decode(model)
    assert model.decode_step.fn is not None
    twin = copy.deepcopy(model)
    assert twin.decode_step.fn is None
    nn.quantize(twin, group_size=32, bits=8)  # a changed model retraces
    twin_compiled = decode(twin)
    monkeypatch.setenv("MLX_XLSTM_KERNELS", "0")
    np.testing.assert_allclose(np.array(compiled), np.array(decode(model)), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(np.array(twin_compiled), np.array(decode(twin)), atol=ATOL, rtol=RTOL)


def prompt_then_step(model, ids, lengths=None, bos=False):
    """Logits of a prompt call (a right-padded batch where `lengths` says), then of one step;
    and the state after them."""
    model.args.force_bos_token_insert = bos
    cache = model.make_cache()
    if lengths is not None:
        for c in cache:
            c.prepare(lengths=lengths)
    prompt = model(ids, cache=cache)
    for c in cache:
        c.finalize()
    step = model(ids[:, :1], cache=cache)
    return [prompt, step, *(x for c in cache for x in c.cache)]


@pytest.mark.parametrize("name", ["single", "fused_bias", "paper_mixed"])
@pytest.mark.parametrize("T", [65, 100, 161])
def test_a_prompt_call_in_pieces_equals_one_pass(name, T, monkeypatch):
    """A prompt call longer than MAX_UNDO_CALL runs in pieces of a few lengths (small ones
    here: 16-token units, 32-token pieces), the rest padded with masked steps: the logits and
    every state slot (convolutions included) equal one pass, with BOS inserted in front and
    in a ragged batch whose short row ends in the first piece."""
    from mlx_lm_xlstm import recurrent

    monkeypatch.setattr(recurrent, "prompt_pieces_pay", lambda: True)  # as on CUDA
    monkeypatch.setattr(recurrent, "PROMPT_UNIT", 16)
    monkeypatch.setattr(recurrent, "PROMPT_PIECE", 32)
    monkeypatch.setattr(recurrent, "PROMPT_SHORTEST", 8)
    model = load_fixture(name)
    ids = mx.array(np.random.default_rng(T).integers(2, model.args.vocab_size, (2, T)))
    cases = [dict(), dict(lengths=[T, 11])] + ([dict(bos=True)] if name != "paper_mixed" else [])
    got = [prompt_then_step(model, ids, **case) for case in cases]
    monkeypatch.setattr(recurrent, "MAX_UNDO_CALL", 1 << 20)  # every call in one pass
    want = [prompt_then_step(model, ids, **case) for case in cases]
    for case, got_case, want_case in zip(cases, got, want):
        # a padded row's logits past its length are nobody's (mlx-lm drops them)
        valid = np.arange(T)[None, :, None] < np.array(case.get("lengths", [T, T]))[:, None, None]
        got_case[0], want_case[0] = (np.where(valid, np.array(x), 0.0) for x in (got_case[0], want_case[0]))
        for a, b in zip(got_case, want_case):
            assert a.shape == b.shape
            np.testing.assert_allclose(np.array(a), np.array(b), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("on_cuda", [True, False])
def test_ten_prompt_lengths_run_in_a_few_piece_lengths(on_cuda, monkeypatch):
    """On CUDA every prompt length meets forwards of lengths it has met before (the same CUDA
    graphs): ten lengths of mlx-lm's prefill steps make five. Elsewhere a prompt call is one
    forward of its own length (padding would cost compute there)."""
    from mlx_lm_xlstm import recurrent

    monkeypatch.setattr(recurrent, "prompt_pieces_pay", lambda: on_cuda)
    model = load_fixture("single")
    seen = []
    logits_of = model._logits
    monkeypatch.setattr(model, "_logits", lambda inputs, mask, cache: seen.append(inputs.shape[1]) or logits_of(inputs, mask, cache))
    lengths = [1549, 1291, 1033, 775, 516, 310, 2047, 2048, 700, 97]
    for T in lengths:
        start = len(seen)
        model(mx.array(np.random.default_rng(T).integers(2, fixtures.VOCAB, (1, T))), cache=model.make_cache())
        assert sum(seen[start:]) >= T and len(seen) - start <= (3 if on_cuda else 1)
    assert set(seen) <= {128, 256, 512, 1024, 2048} if on_cuda else seen == lengths
