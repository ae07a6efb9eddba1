"""Bad configs and checkpoints fail with errors that name what is wrong; sanitize is idempotent."""

import json

import mlx.core as mx
import pytest
from helpers import fixtures
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model
from safetensors.numpy import load_file, save_file

from mlx_lm_xlstm.checkpoint import fuse_projections, hf_name, mlx_name
from mlx_lm_xlstm.xlstm import Model, ModelArgs

BASE = dict(model_type="xlstm", vocab_size=64, hidden_size=32, num_hidden_layers=1, num_heads=2)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(weight_mode="mixed"), "weight_mode 'mixed'"),
        (dict(num_heads=3), "not divisible by num_heads 3"),
        (dict(hidden_size=None), "needs 'hidden_size' (or 'embedding_dim')"),
        (dict(embedding_dim=64), "'hidden_size' = 32 contradicts 'embedding_dim' = 64"),
        (dict(num_hidden_layers=None), "needs 'num_hidden_layers' (or 'num_blocks')"),
        (dict(chunk_size=0), "chunk_size must be positive"),
    ],
)
def test_bad_config(change, message):
    with pytest.raises(ValueError) as e:
        ModelArgs.from_dict({**BASE, **change})
    assert message in str(e.value)


def test_nx_ai_names_are_read():
    args = ModelArgs.from_dict({"model_type": "xlstm", "embedding_dim": 32, "num_blocks": 3, "num_heads": 2})
    assert (args.hidden_size, args.num_hidden_layers) == (32, 3)


def broken_checkpoint(tmp_path, edit):
    folder = fixtures.model_dir(tmp_path / "m", "single")
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda w: w.pop("backbone.blocks.1.mlstm_layer.q.weight"), "missing tensors ['backbone.blocks.1.mlstm_layer.q.weight']"),
        (lambda w: w.__setitem__("backbone.blocks.0.extra.weight", w["backbone.out_norm.weight"]), "unexpected tensors ['backbone.blocks.0.extra.weight']"),
        (lambda w: w.__setitem__("backbone.blocks.0.mlstm_layer.k.weight", w["backbone.blocks.0.mlstm_layer.v.weight"]), "tensor 'backbone.blocks.0.mlstm_layer.k.weight' has shape (32, 32), the config implies (16, 32)"),
    ],
)
def test_bad_checkpoint(tmp_path, edit, message):
    with pytest.raises(ValueError) as e:
        load_model(broken_checkpoint(tmp_path, edit))
    assert message in str(e.value)


def test_sanitize_is_idempotent_and_splits_fused():
    config = json.loads((fixtures.FIXTURES / "fused_bias" / "config.json").read_text())
    model = Model(ModelArgs.from_dict(config))
    raw = {k: mx.array(v) for k, v in load_file(fixtures.FIXTURES / "fused_bias" / "model.safetensors").items()}
    once = model.sanitize(dict(raw))
    twice = model.sanitize(dict(once))
    assert not any("qkv_opreact" in k or "ifgate" in k or "proj_up_gate_z" in k for k in once)
    assert once.keys() == twice.keys() == dict(tree_flatten(model.parameters())).keys()
    assert all(mx.array_equal(once[k], twice[k]) for k in once)
    # transformers' fused layout is ours: i before f, gate before up, rows as they are
    assert mx.array_equal(once["backbone.layers.0.mlstm_layer.if_gate_preact.bias"], raw["backbone.blocks.0.mlstm_layer.ifgate_preact.bias"])
    assert mx.array_equal(once["backbone.layers.1.ffn.gate_up_proj.weight"], raw["backbone.blocks.1.ffn.proj_up_gate_z.weight"])


def test_sanitize_joins_single_projections_in_row_order():
    """transformers' single layout (xLSTM-7b's checkpoint): q, k, v, output gate into
    qkvo_proj; input, forget gate into if_gate_preact; gate, up into gate_up_proj."""
    config = json.loads((fixtures.FIXTURES / "fused_bias" / "config.json").read_text())
    model = Model(ModelArgs.from_dict(config))
    a = model.args
    D, H, F = a.hidden_size, a.num_heads, a.ffn_dim
    parts = {"q": a.qk_dim, "k": a.qk_dim, "v": a.v_dim, "ogate_preact": a.v_dim}
    layer = "backbone.blocks.0.mlstm_layer"
    single = {f"{layer}.{name}.weight": mx.random.normal((rows, D)) for name, rows in parts.items()}
    single.update({f"{layer}.{g}.bias": mx.random.normal((H,)) for g in ("igate_preact", "fgate_preact")})
    single.update({f"backbone.blocks.0.ffn.{p}.weight": mx.random.normal((F, D)) for p in ("proj_up_gate", "proj_up")})
    fused = fuse_projections(model, {mlx_name(k): v for k, v in single.items()})
    qkvo = fused["backbone.layers.0.mlstm_layer.qkvo_proj.weight"]
    assert mx.array_equal(qkvo, mx.concatenate([single[f"{layer}.{n}.weight"] for n in parts])).item()
    gates = fused["backbone.layers.0.mlstm_layer.if_gate_preact.bias"]
    assert mx.array_equal(gates, mx.concatenate([single[f"{layer}.igate_preact.bias"], single[f"{layer}.fgate_preact.bias"]])).item()
    gate_up = fused["backbone.layers.0.ffn.gate_up_proj.weight"]
    assert mx.array_equal(gate_up[:F], single["backbone.blocks.0.ffn.proj_up_gate.weight"]).item()
    del single[f"{layer}.v.weight"]
    with pytest.raises(ValueError, match=r"missing tensors \['backbone.blocks.0.mlstm_layer.v.weight'\]"):
        fuse_projections(model, {mlx_name(k): v for k, v in single.items()}, hf_name)
