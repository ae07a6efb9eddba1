"""Checkpoints as each reference library writes them load and match that library in fp32.

transformers builds and applies `out_norm` whatever `add_out_norm` says, and saves its
weight; NX-AI's xLSTMLarge follows the flag (no norm, no weight) and keeps its embedding
outside the backbone (`embedding.weight`)."""

import dataclasses
import json

import mlx.core as mx
import numpy as np
from conftest import needs_torch
from helpers import fixtures

ATOL, RTOL = 1e-4, 1e-3


@needs_torch
def test_transformers_without_out_norm_flag_still_applies_its_norm(tmp_path):
    from mlx_lm.utils import load_model

    ref = fixtures.save_reference(tmp_path, seed=3, tokenizer=False, add_out_norm=False)
    assert json.loads((tmp_path / "config.json").read_text())["add_out_norm"] is False
    model, _ = load_model(tmp_path)
    ids = np.random.default_rng(0).integers(0, fixtures.VOCAB, size=(2, 37))
    np.testing.assert_allclose(np.array(model(mx.array(ids))), fixtures.reference_logits(ref, ids), atol=ATOL, rtol=RTOL)


@needs_torch
def test_xlstm_large_checkpoint_with_and_without_out_norm(tmp_path):
    import torch
    from mlx_lm.utils import load_model
    from safetensors.torch import save_file
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    ids = np.random.default_rng(1).integers(0, fixtures.VOCAB, size=(2, 41))
    for add_out_norm in (False, True):
        cfg = xLSTMLargeConfig(
            embedding_dim=32, num_heads=2, num_blocks=2, vocab_size=fixtures.VOCAB, add_out_norm=add_out_norm,
            chunk_size=16, ffn_round_up_to_multiple_of=16, mode="inference", return_last_states=False,
            chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native", step_kernel="native",
        )
        torch.manual_seed(4)
        ref = fixtures.randomize(xLSTMLarge(cfg).eval(), seed=4)
        folder = tmp_path / f"out_norm_{add_out_norm}"
        folder.mkdir()
        state = ref.state_dict()
        assert ("backbone.out_norm.weight" in state) == add_out_norm
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"model_type": "xlstm", **dataclasses.asdict(cfg)}))
        model, _ = load_model(folder)
        with torch.no_grad():
            want = ref(torch.tensor(ids)).float().numpy()
        got = np.array(model(mx.array(ids)))
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=f"add_out_norm={add_out_norm}")
