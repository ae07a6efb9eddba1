"""`mlx_lm server`: completions, chat, streaming, batched concurrent requests, prompt-cache reuse."""

import json
from pathlib import Path
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import fixtures
from helpers.cli import server
from mlx_lm import generate, load

PROMPTS = ["def", "import os\n", "class Tree:", "x = [1, 2", "for i in range(10):", "#", "return None", "if a and b:"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return fixtures.model_dir(tmp_path_factory.mktemp("srv") / "m", "single", force_bos_token_insert=True)


@pytest.fixture(scope="module")
def url(folder):
    with server(folder) as base:
        yield base


def post(url, path, body, timeout=60):
    request = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = response.read().decode()
    if body.get("stream"):
        events = [line[len("data: "):] for line in raw.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return [json.loads(e) for e in events[:-1]]
    return json.loads(raw)


def complete(url, prompt):
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0}
    return post(url, "/v1/completions", body)["choices"][0]["text"]


def test_concurrent_completions_equal_one_by_one_generation(folder, url):
    model, tokenizer = load(str(folder))
    expected = [generate(model, tokenizer, p, max_tokens=MAX_TOKENS) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda p: complete(url, p), PROMPTS))
    assert answers == expected


def test_chat_streaming_matches_non_streaming_and_reuses_the_cache(url):
    history = [{"role": "user", "content": "hello"}]
    body = {"messages": history, "max_tokens": MAX_TOKENS, "temperature": 0.0}
    whole = post(url, "/v1/chat/completions", body)
    reply = whole["choices"][0]["message"]["content"]
    assert whole["usage"]["completion_tokens"] == MAX_TOKENS

    chunks = post(url, "/v1/chat/completions", {**body, "stream": True})
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == reply

    # The next turn starts from a cached state instead of prefilling the history again.
    history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "and then?"}]
    follow_up = post(url, "/v1/chat/completions", {**body, "messages": history})
    cached = follow_up["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
    assert cached > 0, follow_up["usage"]


def test_streamed_completion_and_bad_request(url):
    chunks = post(url, "/v1/completions", {"prompt": "def", "max_tokens": MAX_TOKENS, "temperature": 0.0, "stream": True})
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == complete(url, "def")
    with pytest.raises(urllib.error.HTTPError) as error:
        post(url, "/v1/completions", {"prompt": "def", "max_tokens": -3})
    assert error.value.code == 400


DEMO = Path(__file__).resolve().parent.parent / "demo" / "xlstm-stdlib"


def test_second_chat_turn_reuses_the_whole_first_exchange():
    """The demo model's replies start with "\\n\\n": the history must render them as generated,
    or the second turn's prompt leaves the cached state after the prompt's first tokens."""
    history = [{"role": "user", "content": "what is a tuple?"}]
    body = {"max_tokens": 12, "temperature": 0.0}
    with server(DEMO) as base:
        first = post(base, "/v1/chat/completions", {**body, "messages": history})
        reply = first["choices"][0]["message"]["content"]
        history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "and then?"}]
        second = post(base, "/v1/chat/completions", {**body, "messages": history})
    assert reply.startswith("\n")
    # Cached: the first prompt and every reply token (mlx-lm's batch generator has run them all).
    usage = first["usage"]
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == usage["prompt_tokens"] + usage["completion_tokens"], (usage, second["usage"])
