"""Tiny xLSTM checkpoints written by transformers (the reference), a GPT-NeoX-layout
tokenizer trained offline, golden logits for the parity tests, and ready-to-load folders.

    python -m tests.helpers.fixtures --out tests/fixtures     # rewrite the committed golden fixtures
"""

import argparse
import json
import shutil
import sysconfig
from functools import lru_cache
from pathlib import Path

import numpy as np

# name -> transformers xLSTMConfig overrides (tiny; several heads, chunk sizes, modes)
CONFIGS = {
    "single": dict(hidden_size=32, num_heads=2, chunk_size=16),
    "fused_bias": dict(hidden_size=32, num_heads=4, chunk_size=8, weight_mode="fused", use_bias=True),
    "one_head": dict(hidden_size=24, num_heads=1, chunk_size=64, qk_dim_factor=0.5),
    "wide_v": dict(hidden_size=32, num_heads=2, chunk_size=32, v_dim_factor=1.5, weight_mode="fused"),
}
LENGTHS = (1, 5, 16, 33, 200)
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
VOCAB = 320  # 256 bytes + 2 specials + merges of the byte-level tokenizer


def tiny_config(**overrides):
    from transformers import xLSTMConfig

    base = dict(
        vocab_size=VOCAB, num_hidden_layers=2, num_heads=2, hidden_size=32,
        chunk_size=16, ffn_round_up_to_multiple_of=16, max_inference_chunksize=1 << 20,
    )
    return xLSTMConfig(**{**base, **overrides})


def randomize(model, seed: int = 0):
    """Random weights everywhere, gates and norms included (the default init zeroes gates)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "gate_preact.bias" in name or "ifgate_preact.bias" in name:
                p.copy_(2.0 * r + (2.0 if "fgate" in name else 0.0))
            elif name.endswith("norm.weight") or "norm_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            elif "embeddings" in name:
                p.copy_(r)
            else:
                p.copy_(r / p.shape[-1] ** 0.5)
    return model


def save_reference(path, seed=0, tokenizer=True, extra_config=None, **overrides):
    """A transformers xLSTMForCausalLM checkpoint folder (+ tokenizer). Returns the torch model."""
    from transformers import xLSTMForCausalLM, xLSTMPreTrainedModel

    path = Path(path)
    # transformers' own init breaks on fused gates; every weight is randomized anyway.
    base = xLSTMPreTrainedModel
    init, base._init_weights = base._init_weights, lambda self, module: None
    try:
        model = xLSTMForCausalLM(tiny_config(**overrides))
    finally:
        base._init_weights = init
    model = randomize(model.eval(), seed)
    model.save_pretrained(path)
    if extra_config:
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(extra_config)
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer:
        fixture_tokenizer().save_pretrained(path)
    return model


def training_text(limit: int = 200_000) -> str:
    """Text every Python install has: the standard library's own source."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    parts = [(lib / n).read_text(encoding="utf-8") for n in ("textwrap.py", "difflib.py", "argparse.py")]
    return "\n".join(parts)[:limit]


@lru_cache(maxsize=None)
def fixture_tokenizer():
    """The byte-level BPE of every test folder: VOCAB tokens learnt from training_text()."""
    from mlx_lm_xlstm.save import byte_level_tokenizer

    return byte_level_tokenizer(VOCAB, [training_text()])


def model_dir(path, fixture: str = "single", **config_updates) -> Path:
    """A ready-to-load model folder (no torch needed): a committed golden checkpoint,
    a tokenizer, and config changes (e.g. force_bos_token_insert=True)."""
    path = Path(path)
    shutil.copytree(FIXTURES / fixture, path, ignore=shutil.ignore_patterns("golden.npz"))
    config = json.loads((path / "config.json").read_text())
    config.update(config_updates)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    fixture_tokenizer().save_pretrained(path)
    return path


def random_model_dir(path, seed=0, dtype="float32", q_bits=None, q_group_size=32, **config_updates) -> Path:
    """A loadable folder like model_dir, with fresh random MLX weights so that the shapes may
    change (e.g. hidden_size=128 for real quantization group sizes); no torch. dtype and
    q_bits as `mlx_lm convert` applies them (the gates stay fp32, quantize_model)."""
    import mlx.core as mx
    from mlx.utils import tree_map_with_path
    from mlx_lm.utils import quantize_model

    from mlx_lm_xlstm.save import save_checkpoint
    from mlx_lm_xlstm.xlstm import Model, ModelArgs

    config = json.loads((FIXTURES / "single" / "config.json").read_text())
    config.update(config_updates)
    for name, alias in (("hidden_size", "embedding_dim"), ("num_hidden_layers", "num_blocks")):
        config[alias] = config[name]
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    cast = model.cast_predicate

    def init(name, w):
        if name.endswith("if_gate_preact.bias"):  # input gates, then forget gates
            w = w + mx.repeat(mx.array([0.0, 3.0]), w.shape[0] // 2)  # forget gates open, as in trained checkpoints
        return w.astype(getattr(mx, dtype)) if cast(name) else w

    model.update(tree_map_with_path(init, model.parameters()))
    if q_bits:
        model, config = quantize_model(model, config, q_group_size, q_bits)
    return save_checkpoint(path, model, config, tokenizer=fixture_tokenizer())


def reference_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        # use_cache=False: transformers sizes its cache with dims rounded up to 64, its layers do not.
        return model(torch.from_numpy(ids), use_cache=False).logits.float().numpy()


def write_golden(out: Path):
    """Checkpoint folders plus transformers' logits, so parity also runs without torch."""
    out.mkdir(parents=True, exist_ok=True)
    for name, overrides in CONFIGS.items():
        folder = out / name
        shutil.rmtree(folder, ignore_errors=True)
        model = save_reference(folder, seed=len(name), tokenizer=False, **overrides)
        (folder / "generation_config.json").unlink()
        rng = np.random.default_rng(0)
        ids = rng.integers(0, VOCAB, size=(2, max(LENGTHS)))
        np.savez_compressed(folder / "golden.npz", ids=ids, logits=reference_logits(model, ids))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures"))
    write_golden(parser.parse_args().out)
