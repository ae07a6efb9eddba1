"""Whole-sequence losses (`mlx_lm perplexity`'s eval_ppl, as evaluate and the trainer use them)
and `mlx_lm benchmark`.

`mlx_lm perplexity` loads its text through HF `datasets` (not a dependency here), so its
scoring function is exercised directly on the tokens it would get."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from helpers import fixtures
from helpers.cli import cli
from mlx_lm.perplexity import eval_ppl
from mlx_lm.utils import load


def test_whole_sequence_perplexity_equals_token_by_token(model_folder):
    model, tokenizer = load(str(model_folder))
    tokens = tokenizer.encode(fixtures.training_text(4000))
    data = mx.array(np.array(tokens[: 6 * 65]).reshape(6, 65))
    ppl, se = eval_ppl(model, data, batch_size=4)
    assert math.isfinite(ppl) and ppl > 1 and se > 0  # random weights: no bound below vocab

    losses = []  # the same tokens fed in pieces through the recurrent state
    for row in data:
        cache, logits = model.make_cache(), []
        for start in range(0, 64, 24):
            logits.append(model(row[None, start : min(start + 24, 64)], cache=cache))
        logits = mx.concatenate(logits, axis=1).astype(mx.float32)
        losses.append(nn.losses.cross_entropy(logits[0], row[1:]))
    assert math.isclose(math.exp(mx.concatenate(losses).mean().item()), ppl, rel_tol=1e-4)


def test_benchmark_cli(model_folder):
    out = cli("benchmark", "--model", model_folder, "--prompt-tokens", "64", "--generation-tokens", "16",
              "--num-trials", "1", "--batch-size", "2").stdout
    assert "Averages: prompt_tps=" in out and "generation_tps=" in out
