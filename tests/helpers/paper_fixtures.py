"""Tiny checkpoints of the paper's xLSTM written by NX-AI's `xlstm` package (the reference),
and golden logits, so the parity tests also run without torch.

    python -m tests.helpers.paper_fixtures --out tests/fixtures     # rewrite tests/fixtures/paper_*

Needs torch and `pip install --no-deps xlstm` (the vanilla sLSTM backend runs on CPU).
"""

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from .fixtures import fixture_tokenizer

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
VOCAB = 64
GOLDEN_LENGTH = 20

# name -> (stack overrides, mLSTM layer overrides or None, sLSTM layer overrides or None, ffn overrides)
CONFIGS = {
    "paper_mixed": dict(num_blocks=3, slstm_at=[1]),
    "paper_mlstm": dict(num_blocks=2, slstm=None),
    "paper_slstm": dict(num_blocks=2, mlstm=None, slstm=dict(num_heads=4), ffn=dict(act_fn="swish")),
    "paper_cuda_layout": dict(num_blocks=2, slstm_at=[0], backend="cuda"),
    "paper_tied_bias": dict(
        num_blocks=2, slstm_at=[1], tie_weights=True, bias=True, add_post_blocks_norm=False,
        slstm=dict(conv1d_kernel_size=0, group_norm_weight=False), ffn=dict(bias=True, act_fn="relu"),
    ),
}


def reference_config(num_blocks=2, slstm_at=(), embedding_dim=16, vocab_size=VOCAB, mlstm=(), slstm=(),
                     ffn=(), backend="vanilla", **stack):
    """An xLSTMLMModelConfig; mlstm/slstm = None leaves that block type out."""
    from xlstm import (FeedForwardConfig, mLSTMBlockConfig, mLSTMLayerConfig, sLSTMBlockConfig,
                       sLSTMLayerConfig, xLSTMLMModelConfig)

    mlstm_block = None if mlstm is None else mLSTMBlockConfig(
        mlstm=mLSTMLayerConfig(**{"num_heads": 2, "conv1d_kernel_size": 4, "qkv_proj_blocksize": 4,
                                  "proj_factor": 2.0, "round_proj_up_to_multiple_of": 16, **dict(mlstm)}))
    slstm_block = None if slstm is None else sLSTMBlockConfig(
        slstm=sLSTMLayerConfig(**{"backend": "vanilla", "num_heads": 2, "conv1d_kernel_size": 4, **dict(slstm)}),
        feedforward=FeedForwardConfig(**{"proj_factor": 1.3, "act_fn": "gelu", "round_proj_up_to_multiple_of": 16,
                                         **dict(ffn)}))
    cfg = xLSTMLMModelConfig(mlstm_block=mlstm_block, slstm_block=slstm_block, num_blocks=num_blocks,
                             slstm_at=list(slstm_at) if slstm is not None else [], embedding_dim=embedding_dim,
                             vocab_size=vocab_size, context_length=64, **stack)
    cfg.__dict__["_checkpoint_backend"] = backend
    return cfg


def randomize(model, seed: int = 0):
    """Random weights everywhere: gates, recurrent kernels, biases and norms (the default
    init zeroes many of them)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(0.2 * r)  # used as 1 + w
            elif "mlstm_cell.fgate.bias" in name:
                p.copy_(1.0 + r)
            elif name.endswith(("bias", "bias_")):
                p.copy_(0.5 * r)
            elif name.endswith("learnable_skip"):
                p.copy_(1.0 + 0.2 * r)
            elif "_recurrent_kernel_" in name:
                p.copy_(0.5 * r / p.shape[-1] ** 0.5)
            elif "token_embedding" in name:
                p.copy_(r)
            else:
                p.copy_(r / p[0].numel() ** 0.5)
    return model


def build_reference(cfg, seed: int = 0):
    """The reference model (vanilla sLSTM backend, fp32, eval mode) with random weights."""
    import torch
    from xlstm import xLSTMLMModel

    torch.manual_seed(seed)
    return randomize(xLSTMLMModel(cfg).eval(), seed)


def reference_state_dict(model, cfg) -> dict:
    """The state_dict as the checkpoint's backend stores it ("cuda": the sLSTM kernel and
    bias in the CUDA cell's layout, converted with the package's own functions)."""
    from types import SimpleNamespace

    from xlstm.blocks.slstm.cell import sLSTMCell_cuda

    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if cfg.__dict__.get("_checkpoint_backend", "vanilla") == "cuda":
        for i, block in enumerate(model.xlstm_block_stack.blocks):
            cell = getattr(block.xlstm, "slstm_cell", None)
            if cell is None:
                continue
            cuda = SimpleNamespace(config=cell.config)
            prefix = f"xlstm_block_stack.blocks.{i}.xlstm.slstm_cell."
            state[prefix + "_recurrent_kernel_"] = sLSTMCell_cuda._recurrent_kernel_ext2int(
                cuda, cell.recurrent_kernel.clone()).contiguous()
            state[prefix + "_bias_"] = sLSTMCell_cuda._bias_ext2int(cuda, cell.bias.clone()).contiguous()
    return state


def config_dict(cfg) -> dict:
    d = {"model_type": "xlstm", **dataclasses.asdict(cfg)}
    if d["slstm_block"] is not None:
        d["slstm_block"]["slstm"]["backend"] = cfg.__dict__.get("_checkpoint_backend", "vanilla")
    return d


def save_reference(path, model, cfg):
    """config.json + model.safetensors in the paper checkpoint format."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = reference_state_dict(model, cfg)
    if cfg.tie_weights:
        state.pop("lm_head.weight")  # shared with the embedding; safetensors refuses aliases
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config_dict(cfg), indent=2))
    return path


def reference_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(ids)).float().numpy()


def write_golden(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    for seed, (name, overrides) in enumerate(CONFIGS.items()):
        folder = out / name
        shutil.rmtree(folder, ignore_errors=True)
        cfg = reference_config(**overrides)
        model = build_reference(cfg, seed)
        save_reference(folder, model, cfg)
        ids = np.random.default_rng(seed).integers(0, VOCAB, size=(2, GOLDEN_LENGTH))
        np.savez_compressed(folder / "golden.npz", ids=ids, logits=reference_logits(model, ids))


def paper_config(num_blocks=2, slstm_at=(1,), embedding_dim=16, vocab_size=VOCAB, mlstm_heads=2,
                 slstm_heads=2, backend="vanilla", **stack) -> dict:
    """A minimal paper config.json dict without the `xlstm` package (derived keys left out)."""
    return {
        "model_type": "xlstm",
        "mlstm_block": {"mlstm": {"num_heads": mlstm_heads, "conv1d_kernel_size": 4, "qkv_proj_blocksize": 4,
                                  "proj_factor": 2.0, "round_proj_up_to_multiple_of": 16}},
        "slstm_block": {"slstm": {"num_heads": slstm_heads, "conv1d_kernel_size": 4, "backend": backend},
                        "feedforward": {"proj_factor": 1.3, "act_fn": "gelu", "round_proj_up_to_multiple_of": 16}},
        "num_blocks": num_blocks, "slstm_at": list(slstm_at), "embedding_dim": embedding_dim,
        "vocab_size": vocab_size, **stack,
    }


def mlx_checkpoint(path, config: dict, seed: int = 0, tokenizer: bool = False) -> Path:
    """A paper checkpoint folder with the MLX model's own (paper) init; no torch needed.
    With tokenizer=True, the tests' byte-level tokenizer (needs vocab_size 320)."""
    import mlx.core as mx

    from mlx_lm_xlstm.paper import Model, ModelArgs
    from mlx_lm_xlstm.save import save_checkpoint

    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(dict(config)))
    return save_checkpoint(path, model, config, tokenizer=fixture_tokenizer() if tokenizer else None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=FIXTURES)
    write_golden(parser.parse_args().out)
