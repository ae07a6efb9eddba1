"""Speculative decoding (mlx-lm's `--draft-model`) with xLSTM targets and drafts: exact.

mlx-lm's loop feeds the target one (k+1)-token call and the draft k single tokens a round,
then trims both by what the target rejected; `UndoableCache` replays the kept tokens from
the state before the round. Everything here runs mlx-lm's own functions and compares with
plain greedy generation or with a cache that never saw the trimmed tokens.
"""

import copy
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import load_fixture
from mlx.utils import tree_map
from mlx_lm import load, stream_generate
from mlx_lm.generate import generate_step, speculative_generate_step
from mlx_lm.models import llama
from mlx_lm.models.cache import (
    ArraysCache,
    LRUPromptCache,
    can_trim_prompt_cache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

from mlx_lm_xlstm.cache import MAX_UNDO_CALL, MAX_UNDO_STEPS, UndoableCache

ROOT = Path(__file__).resolve().parent.parent
DEMO, DRAFT = ROOT / "demo" / "xlstm-stdlib", ROOT / "demo" / "xlstm-stdlib-draft"
PROMPT = "    def __init__(self, name"
TOKENS = 40


def fp32(model):
    model.set_dtype(mx.float32)
    return model


@pytest.fixture(scope="module")
def demo():
    model, tokenizer = load(str(DEMO))
    return fp32(model), tokenizer


@pytest.fixture(scope="module")
def draft():
    return fp32(load(str(DRAFT))[0])


def tiny_llama(vocab_size: int, seed: int = 0):
    """A random llama with the demo's vocabulary: another kind of mlx-lm model (KV cache)."""
    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
        num_attention_heads=2, rms_norm_eps=1e-5, vocab_size=vocab_size,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def perturbed(model, scale: float, seed: int = 1):
    """A draft that agrees with `model` often but not always: its weights plus noise."""
    mx.random.seed(seed)
    twin = copy.deepcopy(model)
    twin.update(tree_map(lambda p: p + scale * p.std() * mx.random.normal(p.shape), twin.parameters()))
    return twin


@pytest.fixture(scope="module")
def paper():
    return fp32(load_fixture("paper_mixed"))


def greedy(model, prompt, n=TOKENS):
    return [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


def speculative(model, draft_model, prompt, k, n=TOKENS, prompt_cache=None):
    """(tokens, from_draft flags) of mlx-lm's speculative loop, greedy."""
    steps = speculative_generate_step(
        mx.array(prompt), model, draft_model, num_draft_tokens=k, max_tokens=n, prompt_cache=prompt_cache
    )
    tokens, flags = zip(*((t, d) for t, _, d in steps))
    return list(tokens), list(flags)


def some_draft_rejected(flags, k) -> bool:
    """A round that yielded fewer than k drafted tokens before the target's own one."""
    runs, run = [], 0
    for from_draft in flags:
        if from_draft:
            run += 1
        else:
            runs.append(run)
            run = 0
    return any(r < k for r in runs[:-1])


def models_for(kind, demo, draft, paper):
    model, tokenizer = demo
    ids = tokenizer.encode(PROMPT)
    if kind == "smaller xLSTM draft":
        return model, draft, ids
    if kind == "target as its own draft":
        return model, model, ids
    if kind == "llama draft":
        return model, tiny_llama(model.args.vocab_size), ids
    if kind == "xLSTM draft of a llama target":
        target = tiny_llama(model.args.vocab_size)
        return target, perturbed(model, 0.5), ids
    if kind == "paper stack (sLSTM + mLSTM, convolutions)":
        return paper, perturbed(paper, 0.5), [3, 14, 15, 9, 2, 6]
    raise ValueError(kind)


KINDS = [
    "smaller xLSTM draft",
    "target as its own draft",
    "llama draft",
    "xLSTM draft of a llama target",
    "paper stack (sLSTM + mLSTM, convolutions)",
]


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_speculative_output_is_plain_greedy_output(kind, k, demo, draft, paper):
    model, draft_model, prompt = models_for(kind, demo, draft, paper)
    tokens, flags = speculative(model, draft_model, prompt, k)
    assert tokens == greedy(model, prompt)
    if kind == "target as its own draft":
        assert not some_draft_rejected(flags, k)
    else:  # the trims were exercised: drafts were rejected, so the caches were cut back
        assert some_draft_rejected(flags, k), flags


def slots(cache):
    return [x for c in cache for x in c.cache]


def assert_same_state(cache, reference, tol=1e-5):
    for a, b in zip(slots(cache), slots(reference)):
        assert a.shape == b.shape
        assert mx.allclose(a, b, rtol=tol, atol=tol).item(), mx.abs(a - b).max().item()


# (calls after the prompt, as mlx-lm makes them): a target's verify call, a draft's single
# tokens, a draft's round after all its drafts were accepted (2 tokens, then single ones).
PATTERNS = {"verify": [6], "draft": [1, 1, 1, 1], "draft after acceptance": [2, 1, 1, 1]}


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("arch", ["xLSTM-7b", "paper"])
def test_trim_leaves_the_state_of_a_run_that_never_saw_the_trimmed_tokens(arch, pattern, demo, paper):
    model = demo[0] if arch == "xLSTM-7b" else paper
    vocab = model.args.vocab_size
    prompt = [7, 3, 11, 5, 2, 9, 4][: 7 if arch == "xLSTM-7b" else 5]
    calls = PATTERNS[pattern]
    fed = [(13 * j + 1) % vocab for j in range(sum(calls))]
    for n in range(sum(calls) + 1):
        cache = make_prompt_cache(model)
        model(mx.array([prompt]), cache=cache)
        start = 0
        for size in calls:
            model(mx.array([fed[start : start + size]]), cache=cache)
            start += size
        assert trim_prompt_cache(cache, n) == n
        assert not can_trim_prompt_cache(cache)  # nothing fed since: nothing to undo
        reference = make_prompt_cache(model)
        model(mx.array([prompt + fed[: len(fed) - n]]), cache=reference)
        assert_same_state(cache, reference)
        # ... and the next token sees the same history.
        nxt = mx.array([[fed[0]]])
        assert mx.allclose(model(nxt, cache=cache), model(nxt, cache=reference), rtol=1e-4, atol=1e-4).item()


def test_trim_back_to_nothing_leaves_a_fresh_cache(demo):
    """The first call on a new cache runs BOS first (force_bos_token_insert): undoing all of
    it leaves a cache that inserts BOS again, like a new one."""
    model, _ = demo
    cache = make_prompt_cache(model)
    model(mx.array([[7, 3, 11]]), cache=cache)
    trim_prompt_cache(cache, 3)
    assert cache[0].empty()
    fresh = make_prompt_cache(model)
    assert mx.allclose(model(mx.array([[0, 5]]), cache=cache), model(mx.array([[0, 5]]), cache=fresh)).item()


@pytest.mark.parametrize("arch", ["xLSTM-7b", "paper"])
def test_target_cache_after_a_speculative_run_continues_like_a_fresh_one(arch, demo, draft, paper):
    if arch == "xLSTM-7b":
        model, draft_model, prompt = demo[0], draft, demo[1].encode(PROMPT)
    else:
        model, draft_model, prompt = paper, perturbed(paper, 0.5), [3, 14, 15, 9, 2, 6]
    cache = make_prompt_cache(model) + make_prompt_cache(draft_model)
    tokens, flags = speculative(model, draft_model, prompt, k=3, n=17, prompt_cache=cache)
    assert some_draft_rejected(flags, 3)
    target = cache[: len(model.layers)]
    # mlx-lm's loop ends with the target's cache after every token it yielded, but the last
    # one when that came from the target itself (not yet fed).
    seen = tokens if flags[-1] else tokens[:-1]
    fresh = make_prompt_cache(model)
    model(mx.array([prompt + seen]), cache=fresh)
    assert_same_state(target, fresh)
    more = mx.array([tokens[-3:]])  # any continuation
    assert mx.allclose(model(more, cache=target), model(more, cache=fresh), rtol=1e-4, atol=1e-4).item()


def test_trim_beyond_the_window_is_refused(demo):
    model, _ = demo
    cache = make_prompt_cache(model)
    model(mx.array([list(range(2, MAX_UNDO_CALL + 3))]), cache=cache)  # a prefill piece: not undoable
    assert can_trim_prompt_cache(cache) and trim_prompt_cache(cache, 0) == 0
    model(mx.array([list(range(2, MAX_UNDO_CALL + 3))]), cache=cache)
    with pytest.raises(ValueError, match="cannot undo 1 tokens"):
        cache[0].trim(1)

    model(mx.array([[5, 6, 7]]), cache=cache)
    with pytest.raises(ValueError, match="cannot undo 4 tokens: the cache keeps only the last 3"):
        cache[0].trim(4)

    # Plain decoding past the window closes it: the cache is an ArraysCache again.
    for token in range(MAX_UNDO_STEPS + 1):
        model(mx.array([[token + 2]]), cache=cache)
    assert not can_trim_prompt_cache(cache)
    with pytest.raises(ValueError, match="cannot undo 1 tokens"):
        cache[0].trim(1)


def test_more_draft_tokens_than_the_window_holds_are_refused_not_wrong(demo):
    model, tokenizer = demo
    with pytest.raises(ValueError, match="cannot undo"):
        speculative(model, tiny_llama(model.args.vocab_size), tokenizer.encode(PROMPT), k=MAX_UNDO_CALL, n=80)


def test_stored_caches_are_not_trimmable(demo, draft):
    """mlx-lm's server stores the live cache after a request served alone (a draft model, a
    seed) in its LRUPromptCache, which trims a stored cache that says it is trimmable by any
    amount and drops its shorter prefixes: a stored cache says no, a copy of it (the next
    request's cache) says yes until fed."""
    model, tokenizer = demo
    prompt = tokenizer.encode(PROMPT)

    after_speculation = make_prompt_cache(model) + make_prompt_cache(draft)
    speculative(model, draft, prompt, k=3, n=9, prompt_cache=after_speculation)
    assert not can_trim_prompt_cache(after_speculation)
    assert can_trim_prompt_cache(copy.deepcopy(after_speculation))

    after_long_plain_run = make_prompt_cache(model)
    list(generate_step(mx.array(prompt), model, max_tokens=MAX_UNDO_STEPS + 2, prompt_cache=after_long_plain_run))
    assert not can_trim_prompt_cache(after_long_plain_run)

    # A short plain run looks like a draft's first round until asked twice (store, then fetch).
    after_short_plain_run = make_prompt_cache(model)
    list(generate_step(mx.array(prompt), model, max_tokens=3, prompt_cache=after_short_plain_run))
    assert can_trim_prompt_cache(after_short_plain_run)
    assert not can_trim_prompt_cache(after_short_plain_run)

    layer = after_speculation[0]  # a batch, like a plain ArraysCache, cannot be trimmed
    assert not layer.merge([layer, copy.deepcopy(layer)]).is_trimmable()
    assert type(layer.extract(0)) is ArraysCache


def test_server_store_hands_back_recomputed_states_with_and_without_draft(demo, draft):
    """mlx-lm's server loop for requests served alone (`_serve_single`): fetch the nearest
    stored prefix, generate from it, store the live cache under prompt + reply. Prefix-sharing
    requests get what fresh runs get."""
    model, tokenizer = demo
    prompts = ["def f(x):\n    return x", "def f(x):\n    return y", "def f(x):\n", "def f(x):\n    return x + 1",
               "def g(", "def f(x):\n    return x"]
    for draft_model in (None, draft):
        store = LRUPromptCache(max_size=10)
        for text in prompts:
            ids = tokenizer.encode(text)
            cache, rest = store.fetch_nearest_cache("m", ids)
            if cache is None:
                cache = make_prompt_cache(model) + (make_prompt_cache(draft_model) if draft_model else [])
            kw = dict(draft_model=draft_model, num_draft_tokens=3) if draft_model else {}
            reply = [r.token for r in stream_generate(model, tokenizer, rest, max_tokens=6, prompt_cache=cache, **kw)]
            fresh = [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=6)]
            assert reply == fresh, (text, draft_model is not None)
            store.insert_cache("m", ids + reply, cache)


def test_prompt_cache_files_hold_the_plain_cache(demo, tmp_path):
    model, tokenizer = demo
    cache = make_prompt_cache(model)
    model(mx.array([tokenizer.encode(PROMPT)]), cache=cache)
    save_prompt_cache(str(tmp_path / "p.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "p.safetensors"))
    assert [type(c) for c in loaded] == [ArraysCache] * len(cache)
    assert_same_state(loaded, cache, tol=0)
    nxt = mx.array([[5]])
    assert mx.allclose(model(nxt, cache=loaded), model(nxt, cache=cache)).item()


def test_compiled_and_plain_paths_give_the_same_speculative_tokens(demo, draft, monkeypatch):
    model, tokenizer = demo
    prompt = tokenizer.encode(PROMPT)
    fast = speculative(model, draft, prompt, k=3)
    monkeypatch.setenv("MLX_XLSTM_KERNELS", "0")
    assert speculative(model, draft, prompt, k=3) == fast


def test_window_memory_is_one_state_and_the_kept_inputs(demo):
    model, _ = demo
    cache = make_prompt_cache(model)
    model(mx.array([[7, 3, 11, 5]]), cache=cache)
    plain = sum(x.nbytes for x in slots(cache))
    model(mx.array([[2, 9, 4]]), cache=cache)  # a verify call of 3 tokens
    a = model.args
    per_token = 4 * (2 * a.qk_dim + 2 * a.v_dim + 2 * a.num_heads) * len(model.layers)  # fp32 qkvo, i, f
    assert sum(c.nbytes for c in cache) == 2 * plain + 3 * per_token
    trim_prompt_cache(cache, 1)
    assert sum(c.nbytes for c in cache) == plain


def test_undoable_cache_is_what_the_models_make(demo, paper):
    for model in (demo[0], paper):
        assert all(isinstance(c, UndoableCache) for c in make_prompt_cache(model))


@pytest.fixture(scope="module")
def draft_folder(tmp_path_factory):
    """A random xLSTM with the test folders' tokenizer: a draft that is often wrong."""
    from helpers import fixtures

    return fixtures.random_model_dir(tmp_path_factory.mktemp("draft") / "xlstm", seed=3)


def test_mlx_lm_generate_with_a_draft_model_prints_plain_greedy_text(model_folder, draft_folder):
    from helpers.cli import cli, generated_text

    args = ["generate", "--model", model_folder, "--ignore-chat-template", "--prompt", "def f(x):",
            "--max-tokens", "24", "--temp", "0", "--verbose", "True"]
    plain = generated_text(cli(*args).stdout)
    for k in (1, 3):
        assert generated_text(cli(*args, "--draft-model", draft_folder, "--num-draft-tokens", k).stdout) == plain


SERVER_PROMPTS = ["def f(x):\n    return x", "def f(x):\n    return y", "def f(", "def f(x):\n    return x + 1", "import os"]


@pytest.mark.parametrize("with_draft", [False, True])
def test_server_answers_prefix_sharing_requests_as_fresh_runs(model_folder, draft_folder, with_draft):
    """mlx_lm server, its prompt store warm: each answer is what a fresh greedy run gives.
    Without a draft, requests with a seed are served one at a time, storing the live cache."""
    from helpers.cli import server
    from mlx_lm import generate
    from test_cli_server import post

    model, tokenizer = load(str(model_folder))
    fresh = [generate(model, tokenizer, p, max_tokens=8) for p in SERVER_PROMPTS]
    extra = ["--draft-model", draft_folder, "--num-draft-tokens", "3"] if with_draft else []
    with server(model_folder, *extra) as url:
        for seed in (0, None):
            for prompt, expected in zip(SERVER_PROMPTS, fresh):
                body = {"prompt": prompt, "max_tokens": 8, "temperature": 0.0}
                if seed is not None:
                    body["seed"] = seed
                assert post(url, "/v1/completions", body)["choices"][0]["text"] == expected, (prompt, seed)


def test_sampled_tokens_come_from_the_state_of_the_whole_sequence(demo, draft):
    """With sampling, mlx-lm keeps a draft token when the target samples the same one; every
    token's distribution must be the target's after exactly the tokens before it."""
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = demo
    prompt = tokenizer.encode(PROMPT)
    mx.random.seed(7)
    steps = speculative_generate_step(mx.array(prompt), model, draft, num_draft_tokens=3, max_tokens=24,
                                      sampler=make_sampler(temp=1.0))
    tokens, logprobs, flags = zip(*steps)
    assert some_draft_rejected(flags, 3) and any(flags)
    fresh = model(mx.array([prompt + list(tokens[:-1])]))[0, len(prompt) - 1 :].astype(mx.float32)
    fresh = fresh - mx.logsumexp(fresh, axis=-1, keepdims=True)
    assert mx.allclose(mx.stack(logprobs), fresh, atol=1e-4).item()
