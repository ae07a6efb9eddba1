"""Tiny xLSTM checkpoints written by transformers (the reference), a GPT-NeoX-layout
tokenizer trained offline, and golden logits for the parity tests.

    python tools/fixtures.py --out tests/fixtures     # rewrite the committed golden fixtures
"""

import argparse
import json
import shutil
import sysconfig
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
FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
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


def save_checkpoint(path, seed=0, tokenizer=True, extra_config=None, **overrides):
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
        build_tokenizer(path, VOCAB)
    return model


def training_text(limit: int = 200_000) -> str:
    """Text every Python install has: the standard library's own source."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    parts = [(lib / n).read_text(encoding="utf-8") for n in ("textwrap.py", "difflib.py", "argparse.py")]
    return "\n".join(parts)[:limit]


def build_tokenizer(path, vocab_size: int, texts=None):
    """Byte-level BPE in the GPT-NeoX layout: <|endoftext|> = 0 (BOS/EOS/UNK), <|padding|> = 1,
    trained on `texts` (default: a slice of the standard library's source)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts or [training_text()], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|padding|>",
    )
    fast.save_pretrained(path)
    return fast


def model_dir(path, fixture: str = "single", **config_updates) -> Path:
    """A ready-to-load model folder (no torch needed): a committed golden checkpoint,
    a tokenizer, and config changes (e.g. force_bos_token_insert=True)."""
    path = Path(path)
    shutil.copytree(FIXTURES / fixture, path, ignore=shutil.ignore_patterns("golden.npz"))
    config = json.loads((path / "config.json").read_text())
    config.update(config_updates)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    build_tokenizer(path, VOCAB)
    return path


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
        model = save_checkpoint(folder, seed=len(name), tokenizer=False, **overrides)
        (folder / "generation_config.json").unlink()
        rng = np.random.default_rng(0)
        ids = rng.integers(0, VOCAB, size=(2, max(LENGTHS)))
        np.savez_compressed(folder / "golden.npz", ids=ids, logits=reference_logits(model, ids))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures"))
    write_golden(parser.parse_args().out)
