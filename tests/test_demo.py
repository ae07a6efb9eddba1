"""The embedded demo model (demo/xlstm-stdlib) loads with mlx-lm and writes Python-like text."""

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

DEMO = Path(__file__).resolve().parent.parent / "demo" / "xlstm-stdlib"

# Python the model never saw (written for this test), and the same tokens shuffled.
CODE = '''class Counter:
    """Count things."""

    def __init__(self, start=0):
        self.value = start

    def add(self, n=1):
        if n < 0:
            raise ValueError("n must be positive")
        self.value += n
        return self.value


def count_lines(path):
    with open(path) as f:
        return len(f.readlines())
'''


@pytest.fixture(scope="module")
def demo():
    from mlx_lm import load

    return load(str(DEMO))


def test_folder_is_small_and_configured_as_nx_ai_does():
    assert sum(f.stat().st_size for f in DEMO.iterdir()) <= 25_000_000
    assert all(f.stat().st_size <= 16 * 2**20 for f in DEMO.iterdir())
    config = json.loads((DEMO / "config.json").read_text())
    assert config["model_type"] == "xlstm"
    assert config["force_bos_token_insert"] is True
    assert config["bos_token_id"] == config["eos_token_id"] == 0


def nll(model, ids) -> float:
    logits = model(mx.array(ids)[None]).astype(mx.float32)
    return nn.losses.cross_entropy(logits[:, :-1], mx.array(ids[1:])[None], reduction="mean").item()


def test_unseen_python_is_far_more_likely_than_the_same_tokens_shuffled(demo):
    model, tokenizer = demo
    ids = tokenizer.encode(CODE)
    shuffled = [int(i) for i in np.random.default_rng(0).permutation(ids)]
    ppl, ppl_shuffled = math.exp(nll(model, ids)), math.exp(nll(model, shuffled))
    assert ppl < 30, ppl
    assert ppl < ppl_shuffled / 10, (ppl, ppl_shuffled)


def test_greedy_generation_is_python_like(demo):
    from mlx_lm import generate

    model, tokenizer = demo
    text = generate(model, tokenizer, prompt="    def __init__(self", max_tokens=48)
    words = {"self", "def", "return", "if", "None", "="}
    assert sum(w in text for w in words) >= 2, text
    tokens = tokenizer.encode(text)
    assert len(set(tokens)) >= 8, text  # not one token repeated
