"""The no-cache forward trains: differentiable, compiles, and its gradients match the reference."""


import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from conftest import compiled_train_step, load_fixture, needs_torch
from helpers import fixtures
from mlx.utils import tree_flatten



def loss_fn(model, ids):
    logits = model(ids[:, :-1])
    return nn.losses.cross_entropy(logits.astype(mx.float32), ids[:, 1:]).mean()


def test_compiled_training_steps_lower_the_loss():
    model = load_fixture("fused_bias")
    optimizer = optim.Adam(learning_rate=3e-3)
    step = compiled_train_step(model, optimizer, loss_fn)
    ids = mx.array(np.random.default_rng(0).integers(0, fixtures.VOCAB, (2, 41)))
    losses = [step(ids).item() for _ in range(15)]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0]


def test_every_parameter_gets_a_gradient():
    model = load_fixture("single")
    ids = mx.array(np.random.default_rng(1).integers(0, fixtures.VOCAB, (2, 40)))
    grads = dict(tree_flatten(nn.value_and_grad(model, loss_fn)(model, ids)[1]))
    assert grads.keys() == dict(tree_flatten(model.trainable_parameters())).keys()
    for name, g in grads.items():
        assert mx.isfinite(g).all().item(), name
        assert mx.abs(g).max().item() > 0, name


@needs_torch
def test_gradients_match_transformers(tmp_path):
    import torch
    from mlx_lm.utils import load_model

    ref = fixtures.save_reference(tmp_path, seed=5, tokenizer=False, hidden_size=32, num_heads=2, chunk_size=8)
    model, _ = load_model(tmp_path)
    ids = np.random.default_rng(2).integers(0, fixtures.VOCAB, (2, 21))
    logits = ref(torch.from_numpy(ids[:, :-1]), use_cache=False).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(ids[:, 1:]).reshape(-1)).backward()
    grads = dict(tree_flatten(nn.value_and_grad(model, loss_fn)(model, mx.array(ids))[1]))
    # each single tensor's gradient is its rows of the fused one
    rows = lambda x, start, n: np.array(x)[start : start + n]
    a, layer = model.args, "backbone.layers.{}.mlstm_layer."
    ours = {
        "backbone.blocks.0.mlstm_layer.k.weight": rows(grads[layer.format(0) + "qkvo_proj.weight"], a.qk_dim, a.qk_dim),
        "backbone.blocks.0.mlstm_layer.fgate_preact.bias": rows(grads[layer.format(0) + "if_gate_preact.bias"], a.num_heads, a.num_heads),
        "backbone.blocks.1.mlstm_layer.igate_preact.weight": rows(grads[layer.format(1) + "if_gate_preact.weight"], 0, a.num_heads),
        "backbone.blocks.1.ffn.proj_up.weight": rows(grads["backbone.layers.1.ffn.gate_up_proj.weight"], a.ffn_dim, a.ffn_dim),
        "backbone.embeddings.weight": np.array(grads["backbone.embeddings.weight"]),
    }
    for name, got in ours.items():
        expected = ref.get_parameter(name).grad.numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-3, err_msg=name)
