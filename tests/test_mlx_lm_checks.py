"""The checks mlx-lm's own tests/test_models.py run on every model."""

import copy

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

from mlx_lm_xlstm.xlstm import Model, ModelArgs

ARGS = dict(model_type="xlstm", vocab_size=100, hidden_size=32, num_hidden_layers=4, num_heads=4, chunk_size=4)


def make_model():
    mx.random.seed(0)
    return Model(ModelArgs.from_dict(dict(ARGS)))


def test_layers_and_type():
    model = make_model()
    assert len(model.layers) == 4 and model.model_type == "xlstm"
    assert len(model.make_cache()) == len(model.layers)


def test_forward_shapes_and_dtypes_with_and_without_cache():
    for dtype in (mx.float32, mx.float16):
        model = make_model()
        model.set_dtype(dtype)
        inputs = mx.array([[0, 1, 2, 3, 4, 5]])
        out = model(inputs)
        assert out.shape == (1, 6, 100) and out.dtype == dtype
        cache = make_prompt_cache(model)
        out = model(inputs[:, :2], cache=cache)
        assert out.shape == (1, 2, 100) and out.dtype == dtype
        out = model(inputs[:, 2:3], cache=cache)
        assert out.shape == (1, 1, 100) and out.dtype == dtype
        out = model(mx.array([[0, 1, 2], [3, 4, 5]]))
        assert out.shape == (2, 3, 100)


def test_deepcopy_gives_the_same_outputs():
    model = make_model()
    inputs = mx.array([[3, 1, 4, 1, 5]])
    assert mx.allclose(copy.deepcopy(model)(inputs), model(inputs)).item()


def test_prompt_cache_save_load(tmp_path):
    model = make_model()
    cache = make_prompt_cache(model)
    model(mx.array([[1, 2, 3, 4, 5, 6, 7]]), cache=cache)
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache, {"model": "xlstm"})
    loaded, meta = load_prompt_cache(str(tmp_path / "c.safetensors"), return_metadata=True)
    assert meta == {"model": "xlstm"}
    nxt = mx.array([[8]])
    np.testing.assert_allclose(np.array(model(nxt, cache=loaded)), np.array(model(nxt, cache=cache)), atol=1e-5)


def test_bf16_long_decode_stays_finite():
    model = make_model()
    model.set_dtype(mx.bfloat16)
    cache = make_prompt_cache(model)
    y = mx.array([[1]])
    for _ in range(512):
        logits = model(y, cache=cache)
        y = mx.argmax(logits[:, -1:], axis=-1)
    assert mx.isfinite(logits).all().item()
    assert all(mx.isfinite(c).all().item() for c in cache[-1].cache)
