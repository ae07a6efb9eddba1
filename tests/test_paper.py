"""The paper's xLSTM (NX-AI `xlstm` package: xLSTMLMModel, sLSTM/mLSTM block stack) in MLX:
parity with the reference in fp32, caches, checkpoint handling, gradients and training."""

import copy
import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from conftest import compiled_train_step, needs_torch
from helpers import paper_fixtures as pf
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.models.cache import ArraysCache
from mlx_lm.utils import load_model

from mlx_lm_xlstm.paper import Model, ModelArgs

ATOL = 1e-4


def load(path) -> Model:
    model, _ = load_model(path)
    assert isinstance(model, Model)
    return model


def chunked(model, ids, chunks):
    """Prefill in the given chunk lengths, then decode the rest one token at a time."""
    cache = model.make_cache()
    out, t = [], 0
    for n in chunks:
        out.append(model(mx.array(ids[:, t : t + n]), cache=cache))
        t += n
    while t < ids.shape[1]:
        out.append(model(mx.array(ids[:, t : t + 1]), cache=cache))
        t += 1
    return np.array(mx.concatenate(out, axis=1)), cache


def small_chunks(model, size=4):
    """Force several mLSTM chunks at test lengths (the default chunk is 64)."""
    for block in model.layers:
        if hasattr(block.xlstm, "mlstm_cell"):
            block.xlstm.mlstm_cell.chunk_size = size


# --- parity with committed golden logits (no torch) ---------------------------------------


@pytest.mark.parametrize("name", list(pf.CONFIGS))
def test_golden_logits(name):
    model = load(pf.FIXTURES / name)
    golden = np.load(pf.FIXTURES / name / "golden.npz")
    ids, ref = golden["ids"], golden["logits"]
    for T in (1, 7, pf.GOLDEN_LENGTH):
        out = np.array(model(mx.array(ids[:, :T])))
        np.testing.assert_allclose(out, ref[:, :T], atol=ATOL, rtol=0, err_msg=f"{name} T={T}")
    small_chunks(model)
    out = np.array(model(mx.array(ids)))
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0, err_msg=f"{name} chunk 4")
    out, _ = chunked(model, ids, [6, 5])
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0, err_msg=f"{name} prefill 6+5, then steps")


# --- parity with the live reference (vanilla sLSTM backend on CPU) ---------------------------

LIVE = {
    "mixed_2_of_3_dropout": dict(num_blocks=3, slstm_at=[0, 2], mlstm=dict(num_heads=4, qkv_proj_blocksize=2),
                                 dropout=0.1, add_embedding_dropout=True),  # dropout is off in eval mode
    "mlstm_only_bias": dict(num_blocks=2, slstm=None, bias=True, mlstm=dict(conv1d_kernel_size=2)),
    "slstm_only_cuda": dict(num_blocks=2, mlstm=None, backend="cuda", slstm=dict(num_heads=1),
                            ffn=dict(act_fn="relu^2", round_proj_up_dim_up=False)),
    "slstm_no_ffn_tied": dict(num_blocks=2, slstm_at=[1], tie_weights=True, embedding_dim=24, ffn=None),
}


@needs_torch
@pytest.mark.parametrize("name", list(LIVE))
def test_live_logits(name, tmp_path):
    overrides = dict(LIVE[name])
    ffn = overrides.pop("ffn", ())
    cfg = pf.reference_config(**overrides, ffn=() if ffn is None else ffn)
    if ffn is None:
        cfg.slstm_block.feedforward = None
    ref = pf.build_reference(cfg, seed=11)
    model = load(pf.save_reference(tmp_path, ref, cfg))
    rng = np.random.default_rng(2)
    for T in (1, 5, 17):
        ids = rng.integers(0, pf.VOCAB, size=(2, T))
        expected = pf.reference_logits(ref, ids)
        np.testing.assert_allclose(np.array(model(mx.array(ids))), expected, atol=ATOL, rtol=0, err_msg=f"T={T}")
    small_chunks(model, 3)
    np.testing.assert_allclose(np.array(model(mx.array(ids))), expected, atol=ATOL, rtol=0, err_msg="chunk 3")
    out, _ = chunked(model, ids, [4, 7])
    np.testing.assert_allclose(out, expected, atol=ATOL, rtol=0, err_msg="prefill 4+7, then steps")


@needs_torch
def test_gradient_matches_reference(tmp_path):
    """d(loss)/d(parameter) equals torch's for the sLSTM recurrent kernel, the mLSTM gates and
    the causal conv (in our layouts)."""
    import torch

    cfg = pf.reference_config(num_blocks=2, slstm_at=[1])
    ref = pf.build_reference(cfg, seed=5)
    model = load(pf.save_reference(tmp_path, ref, cfg))
    ids = np.random.default_rng(0).integers(0, pf.VOCAB, size=(2, 9))
    w = np.random.default_rng(1).standard_normal((2, 9, pf.VOCAB)).astype(np.float32)

    ref.zero_grad()
    (ref(torch.from_numpy(ids)) * torch.from_numpy(w)).sum().backward()
    loss = lambda m: (m(mx.array(ids)) * mx.array(w)).sum()
    grads = dict(tree_flatten(nn.value_and_grad(model, loss)(model)[1]))

    slstm = ref.xlstm_block_stack.blocks[1].xlstm.slstm_cell
    R_grad = slstm._recurrent_kernel_.grad  # vanilla layout (NH, 4 DH, DH) -> ours
    NH, DH = R_grad.shape[0], R_grad.shape[2]
    R_grad = R_grad.reshape(NH, 4, DH, DH).permute(0, 3, 1, 2).reshape(NH, DH, 4 * DH)
    mlstm = ref.xlstm_block_stack.blocks[0].xlstm
    pairs = {
        "xlstm_block_stack.layers.1.xlstm.slstm_cell.recurrent_kernel": R_grad,
        "xlstm_block_stack.layers.0.xlstm.mlstm_cell.igate.weight": mlstm.mlstm_cell.igate.weight.grad,
        "xlstm_block_stack.layers.0.xlstm.mlstm_cell.fgate.bias": mlstm.mlstm_cell.fgate.bias.grad,
        "xlstm_block_stack.layers.0.xlstm.conv1d.conv.weight": mlstm.conv1d.conv.weight.grad.transpose(1, 2),
        "token_embedding.weight": ref.token_embedding.weight.grad,
    }
    for key, expected in pairs.items():
        expected = expected.numpy()
        assert np.abs(expected).max() > 1e-3, key  # a gradient that could be wrong
        np.testing.assert_allclose(np.array(grads[key]), expected, atol=2e-4, rtol=1e-3, err_msg=key)


# --- caches: batching, padding, masks ---------------------------------------------------------


def _states(cache, row):
    return [np.array(c[row]) for c in cache.cache]


def test_cache_layout_and_advance():
    model = load(pf.FIXTURES / "paper_mixed")
    cache = model.make_cache()
    assert len(cache) == len(model.layers) == 3
    assert all(isinstance(c, ArraysCache) for c in cache)  # UndoableCache: trimmable for speculative decoding
    assert [len(c.cache) for c in cache] == [4, 5, 4]  # mLSTM: conv, C, n, m; sLSTM: conv, y, c, n, m
    for c in cache:
        c.prepare(lengths=[3, 1])
    model(mx.array([[1, 2, 3]] * 2), cache=cache)
    assert all(c.lengths.tolist() == [0, -2] for c in cache)  # advanced by 3 in every layer
    assert all(x is not None for c in cache for x in c.cache)


@pytest.mark.parametrize("name", ["paper_mixed", "paper_tied_bias"])
def test_right_padding_leaves_state_unchanged(name):
    """A right-padded row of a batch ends in the state (and logits) of its own unpadded run."""
    model = load(pf.FIXTURES / name)
    ids = np.random.default_rng(3).integers(2, pf.VOCAB, size=(2, 7))
    lengths = [7, 4]
    batch = model.make_cache()
    for c in batch:
        c.prepare(lengths=lengths)
    logits = np.array(model(mx.array(ids), cache=batch))
    for c in batch:
        c.finalize()
    for row, n in enumerate(lengths):
        alone = model.make_cache()
        expected = np.array(model(mx.array(ids[row : row + 1, :n]), cache=alone))
        np.testing.assert_allclose(logits[row : row + 1, :n], expected, atol=1e-5)
        for cb, ca in zip(batch, alone):
            for got, want in zip(_states(cb, row), _states(ca, 0)):
                np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        # and decoding continues identically
        nxt = mx.array([[5], [5]])
        a = np.array(model(nxt[row : row + 1], cache=alone))
        b = np.array(model(nxt[row : row + 1], cache=[c.extract(row) for c in batch]))
        np.testing.assert_allclose(b, a, atol=1e-5)


def test_left_padding_matches_unpadded():
    model = load(pf.FIXTURES / "paper_mixed")
    ids = np.random.default_rng(4).integers(2, pf.VOCAB, size=(1, 5))
    padded = np.concatenate([np.zeros((1, 3), ids.dtype), ids], axis=1)
    batch = np.concatenate([padded, np.concatenate([ids, ids[:, :3]], axis=1)])
    cache = [ArraysCache(len(c.cache), left_padding=[3, 0]) for c in model.make_cache()]
    out = np.array(model(mx.array(batch), cache=cache))
    expected = np.array(model(mx.array(ids)))
    np.testing.assert_allclose(out[:1, 3:], expected, atol=1e-5)
    np.testing.assert_allclose(out[1:, :5], expected, atol=1e-5)


def test_batch_generation_matches_single():
    """mlx-lm's BatchGenerator (ragged prompts, padding and merged caches) agrees with generate_step."""
    from mlx_lm.generate import BatchGenerator, generate_step

    model = load(pf.FIXTURES / "paper_mixed")
    prompts = [[3, 9, 4, 7, 11], [5, 2]]
    single = []
    for p in prompts:
        toks = [t for (t, _), _ in zip(generate_step(mx.array(p), model, max_tokens=4), range(4))]
        single.append([int(t) for t in toks])
    gen = BatchGenerator(model, stop_tokens=set(), max_tokens=4)
    uids = gen.insert(prompts)
    got = {u: [] for u in uids}
    while responses := gen.next_generated():
        for r in responses:
            got[r.uid].append(int(r.token))
    gen.close()
    assert [got[u] for u in uids] == single


# --- checkpoint handling ------------------------------------------------------------------


def _weights(name):
    return dict(mx.load(str(pf.FIXTURES / name / "model.safetensors")))


def test_sanitize_is_idempotent_and_maps_layouts():
    model = load(pf.FIXTURES / "paper_mixed")
    raw = _weights("paper_mixed")
    assert "xlstm_block_stack.blocks.1.xlstm.slstm_cell._recurrent_kernel_" in raw
    once = model.sanitize(dict(raw))
    twice = model.sanitize(dict(once))
    assert once.keys() == twice.keys()
    assert all(np.array_equal(np.array(once[k]), np.array(twice[k])) for k in once)
    assert set(once) == {k for k, _ in tree_flatten(model.parameters())}
    # the same weights written by the CUDA backend load to the same model
    cuda = load(pf.FIXTURES / "paper_cuda_layout")
    assert cuda.args.slstm_block.slstm.backend == "cuda"
    assert cuda.sanitize(cuda.sanitize(_weights("paper_cuda_layout"))).keys() == dict(tree_flatten(cuda.parameters())).keys()


def test_sanitize_errors_name_the_tensor():
    model = load(pf.FIXTURES / "paper_mixed")
    raw = _weights("paper_mixed")
    key = "xlstm_block_stack.blocks.0.xlstm.proj_down.weight"
    with pytest.raises(ValueError, match="missing tensors.*proj_down"):
        model.sanitize({k: v for k, v in raw.items() if k != key})
    with pytest.raises(ValueError, match="unexpected tensors.*extra"):
        model.sanitize({**raw, "xlstm_block_stack.extra.weight": mx.zeros((2,))})
    with pytest.raises(ValueError, match="proj_down.weight.*shape"):
        model.sanitize({**raw, key: mx.zeros((3, 3))})
    rk = "xlstm_block_stack.blocks.1.xlstm.slstm_cell._recurrent_kernel_"
    with pytest.raises(ValueError, match="_recurrent_kernel_.*backend 'vanilla'"):
        model.sanitize({**raw, rk: raw[rk].swapaxes(1, 2)})  # a CUDA-layout kernel under a vanilla config


def test_config_parsing_and_errors():
    cfg = json.loads((pf.FIXTURES / "paper_mixed" / "config.json").read_text())
    args = ModelArgs.from_dict(cfg)
    assert args.block_map == [0, 1, 0] and args.mlstm_inner_dim == 32 and args.ffn_dim == 32
    assert ModelArgs.from_dict({**cfg, "mlstm_block": None}).block_map == [1, 1, 1]
    assert ModelArgs.from_dict({**cfg, "slstm_at": "all"}).block_map == [1, 1, 1]
    bad = [
        ({**cfg, "slstm_at": [3]}, "slstm_at"),
        ({**cfg, "slstm_block": None}, "no 'slstm_block'"),
        ({**cfg, "slstm_block": {"slstm": {"backend": "triton"}}}, "backend 'triton'"),
        ({**cfg, "slstm_block": {"slstm": {"num_heads": 3}}}, "num_heads 3"),
        ({**cfg, "mlstm_block": {"mlstm": {"num_heads": 5}}}, "num_heads 5"),
    ]
    for config, message in bad:
        with pytest.raises(ValueError, match=message):
            ModelArgs.from_dict(config)


def test_dispatch_through_mlx_lm_xlstm_module():
    """mlx-lm's model module `xlstm` builds the paper model for a paper config."""
    from mlx_lm.models import xlstm

    cfg = json.loads((pf.FIXTURES / "paper_slstm" / "config.json").read_text())
    assert isinstance(xlstm.Model(xlstm.ModelArgs.from_dict(cfg)), Model)


def test_fp16_and_deepcopy():
    model = load(pf.FIXTURES / "paper_mixed")
    ids = mx.array([[1, 2, 3, 4]])
    ref = np.array(model(ids))
    clone = copy.deepcopy(model)
    keep = clone.cast_predicate  # as mlx-lm's convert --dtype applies it
    clone.update(tree_map_with_path(lambda k, v: v.astype(mx.float16) if keep(k) else v, clone.parameters()))
    assert clone.layers[0].xlstm.mlstm_cell.igate.weight.dtype == mx.float32
    out = clone(ids)
    assert out.dtype == mx.float16
    # fp16 weights and activations: 3.3e-3 measured (logits up to 2.6; an fp16 ulp there is 2e-3)
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), ref, atol=5e-3)
    cache = clone.make_cache()
    clone(ids, cache=cache)
    assert cache[1][2].dtype == mx.float32  # recurrent states stay fp32


# --- training -------------------------------------------------------------------------------


def test_compiled_value_and_grad_trains(tmp_path):
    """No-cache forward under mx.compile + value_and_grad, as mlx-lm's trainer runs it."""
    model = Model(ModelArgs.from_dict(pf.paper_config(num_blocks=2, slstm_at=[1])))
    opt = optim.Adam(learning_rate=1e-2)
    ids = mx.array(np.tile(np.arange(12) % 5, (2, 1)))

    def loss(m, x):
        return nn.losses.cross_entropy(m(x[:, :-1]), x[:, 1:]).mean()

    step = compiled_train_step(model, opt, loss)
    losses = []
    for _ in range(15):
        losses.append(step(ids).item())
        mx.eval(model.state, opt.state)
    assert losses[-1] < 0.5 * losses[0]


def test_mlx_lm_trainer(tmp_path):
    """mlx-lm's own trainer (LoRA on the projections of a saved tiny paper checkpoint) lowers the loss."""
    from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    path = pf.mlx_checkpoint(tmp_path / "m", pf.paper_config(vocab_size=320, slstm_at=[1]), tokenizer=True)
    model, tokenizer = load(str(path))
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert any("slstm" not in k and "lora_a" in k for k in trainable)
    text = "def add(a, b):\n    return a + b\n"
    data = [(tokenizer.encode(text), 0)] * 4

    class Losses(TrainingCallback):
        values = []

        def on_train_loss_report(self, info):
            self.values.append(info["train_loss"])

    args = TrainingArgs(batch_size=2, iters=12, steps_per_report=1, steps_per_eval=1000,
                        adapter_file=str(tmp_path / "adapters.safetensors"), max_seq_length=64)
    train(model, optim.Adam(learning_rate=5e-3), data, args=args, training_callback=Losses())
    assert len(Losses.values) == 12
    assert Losses.values[-1] < 0.85 * Losses.values[0]


def test_quantization_leaves_the_mlstm_gates_exact():
    from mlx_lm.utils import quantize_model

    model, _ = quantize_model(load(pf.FIXTURES / "paper_mixed"), {}, group_size=32, bits=4)
    cell = model.layers[0].xlstm.mlstm_cell
    assert not hasattr(cell.igate, "scales") and not hasattr(cell.fgate, "scales")
    assert hasattr(model.layers[0].xlstm.proj_down, "scales")
