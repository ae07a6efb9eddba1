"""batch_generate / BatchGenerator: ragged prompts (right padding + mask) give the same greedy
tokens as one-by-one generation, with and without NX-AI's BOS insertion."""

import pytest
from helpers import fixtures
from mlx_lm import batch_generate, load, stream_generate

PROMPTS = ["<|endoftext|>d", "def f(x):\n    return x", "import os", "class A(object):\n    pass\n\n\nclass B(A):", "x"]


@pytest.mark.parametrize("force_bos", [True, False])
def test_ragged_batch_equals_one_by_one(tmp_path, force_bos):
    folder = fixtures.model_dir(tmp_path / "m", "fused_bias", force_bos_token_insert=force_bos)
    model, tokenizer = load(str(folder))
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts) and prompts[0][0] == 0  # one starts with BOS
    alone = [[r.token for r in stream_generate(model, tokenizer, p, max_tokens=10)] for p in prompts]
    batched = batch_generate(model, tokenizer, prompts, max_tokens=10, return_token_ids=True)
    assert [list(t) for t in batched.token_ids] == alone
