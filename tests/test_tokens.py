"""BOS as NX-AI's force_bos_token_insert intends; generation ends on <|endoftext|> (0), never on 2 ("!")."""

import json

import mlx.core as mx
import numpy as np
from helpers import fixtures
from mlx_lm import load
from mlx_lm.utils import load_model

ATOL, RTOL = 1e-4, 1e-3


def bos_model():
    model, _ = load_model(fixtures.FIXTURES / "single", model_config={"force_bos_token_insert": True})
    return model


def plain_model():
    model, _ = load_model(fixtures.FIXTURES / "single")
    return model


def test_prompt_without_bos_behaves_as_if_bos_were_in_front():
    ids = [[5, 17, 42, 9]]
    with_bos = plain_model()(mx.array([[0] + ids[0]]))[:, 1:]
    np.testing.assert_allclose(np.array(bos_model()(mx.array(ids))), np.array(with_bos), atol=ATOL, rtol=RTOL)


def test_bos_is_not_doubled():
    ids = mx.array([[0, 5, 17, 42]])
    np.testing.assert_allclose(np.array(bos_model()(ids)), np.array(plain_model()(ids)), atol=ATOL, rtol=RTOL)


def test_bos_per_sequence_in_a_batch_and_only_on_a_fresh_cache():
    model, plain = bos_model(), plain_model()
    ids = mx.array([[0, 5, 17], [6, 17, 42]])
    out = model(ids)
    np.testing.assert_allclose(np.array(out[0]), np.array(plain(ids[:1])[0]), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(np.array(out[1]), np.array(plain(mx.array([[0, 6, 17, 42]]))[0, 1:]), atol=ATOL, rtol=RTOL)
    # A warm cache continues the text: no BOS in the middle.
    cache, plain_cache = model.make_cache(), plain.make_cache()
    model(mx.array([[5, 6]]), cache=cache)
    plain(mx.array([[0, 5, 6]]), cache=plain_cache)
    np.testing.assert_allclose(
        np.array(model(mx.array([[7, 8]]), cache=cache)),
        np.array(plain(mx.array([[7, 8]]), cache=plain_cache)),
        atol=ATOL, rtol=RTOL,
    )


def test_generation_stops_on_endoftext_not_on_exclamation_mark(tmp_path):
    folder = fixtures.model_dir(tmp_path / "m", "single", eos_token_id=2, force_bos_token_insert=True)
    _, tokenizer, config = load(str(folder), return_config=True)
    assert tokenizer.eos_token_ids == {0}
    assert tokenizer.decode([2]) == "!"
    assert config["eos_token_id"] == 0
    assert json.loads((folder / "config.json").read_text())["eos_token_id"] == 2  # the file is untouched
