"""mlx_lm_xlstm.save: the one folder writer (mlx-lm's save_model/save_config, built aside and
renamed into place) and the byte-level tokenizer."""

import json

import mlx.core as mx
import pytest
from helpers import fixtures
from mlx_lm.utils import load, load_model, quantize_model

from mlx_lm_xlstm import large
from mlx_lm_xlstm.save import byte_level_tokenizer, save_checkpoint

IDS = mx.array([[5, 17, 42, 7, 3]])


def tiny_model():
    config = {**json.loads((fixtures.FIXTURES / "single" / "config.json").read_text()), "num_heads": 4}
    mx.random.seed(0)
    return large.Model(large.ModelArgs.from_dict(dict(config))), config


@pytest.mark.parametrize("hf_names", [False, True])
def test_folder_loads_with_mlx_lm_and_gives_the_model(tmp_path, hf_names):
    model, config = tiny_model()
    folder = save_checkpoint(tmp_path / "m", model, config, tokenizer=fixtures.fixture_tokenizer(), hf_names=hf_names,
                             files={"notes.txt": "hello"})
    names = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    # transformers' single names (backbone.blocks.N, q, proj_up_gate) or ours (layers.N, qkvo_proj, gate_up_proj)
    assert ("backbone.blocks.0.mlstm_layer.q.weight" in names) == hf_names
    assert ("backbone.blocks.0.ffn.proj_up_gate.weight" in names) == hf_names
    assert ("backbone.layers.0.mlstm_layer.qkvo_proj.weight" in names) != hf_names
    loaded, tokenizer = load(str(folder))
    assert mx.array_equal(loaded(IDS), model(IDS)).item()
    assert tokenizer.encode("def f") == fixtures.fixture_tokenizer().encode("def f")
    assert (folder / "notes.txt").read_text() == "hello"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # nothing left beside it


def test_quantized_layers_keep_their_names_and_count(tmp_path):
    model, config = tiny_model()
    model, config = quantize_model(model, config, group_size=32, bits=4)
    ours = save_checkpoint(tmp_path / "ours", model, config)
    hf = save_checkpoint(tmp_path / "hf", model, config, hf_names=True)
    meta = [json.loads((f / "model.safetensors.index.json").read_text())["metadata"] for f in (ours, hf)]
    assert meta[0] == meta[1]  # same tensors and parameter count, other names
    assert "backbone.blocks.1.ffn.proj_down.scales" in json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    loaded, _ = load_model(hf)
    assert loaded.backbone.layers[0].mlstm_layer.qkvo_proj.bits == 4
    assert mx.array_equal(loaded(IDS), model(IDS)).item()


def test_an_existing_folder_is_kept_unless_overwrite(tmp_path):
    model, config = tiny_model()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="already exists"):
        save_checkpoint(tmp_path / "m", model, config)
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["mine.txt"]
    save_checkpoint(tmp_path / "m", model, config, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors",
                                                                   "model.safetensors.index.json"]


def test_a_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model, config = tiny_model()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("mlx_lm_xlstm.save.save_config", fail)  # after the weights are written
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "m", model, config)
    assert list(tmp_path.iterdir()) == []


def test_byte_level_tokenizer_without_merges_is_one_token_per_byte():
    tokenizer = byte_level_tokenizer(258)
    text = "déf f(x):\n\treturn x\x00"
    ids = tokenizer.encode(text)
    assert len(tokenizer) == 258 and len(ids) == len(text.encode()) and tokenizer.decode(ids) == text
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1) and min(ids) >= 2
    trained = byte_level_tokenizer(300, [fixtures.training_text(20_000)])
    assert len(trained) == 300 and len(trained.encode(text)) < len(ids)  # merges learnt from the text
