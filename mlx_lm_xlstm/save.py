"""Writing a model folder that mlx-lm loads: weights and config through mlx-lm's own
`save_model`/`save_config`, an optional tokenizer, all built in a temporary folder and renamed
into place (`atomic_folder`), and the byte-level BPE tokenizer the demo, the examples and the
tests train.
"""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import save_config, save_model

from .convert import atomic_folder


def save_checkpoint(folder, model: nn.Module, config: dict, tokenizer=None, hf_names: bool = False,
                    files: dict = None, overwrite: bool = False, donate_model: bool = False) -> Path:
    """`folder` with `model`'s weights (safetensors + index), `config` (config.json) and, if
    given, `tokenizer` (anything with `save_pretrained`) and extra text `files` (name -> text).

    hf_names: write xLSTM-7b's tensors under transformers' names (backbone.blocks.N...), as a
    transformers checkpoint holds them, so that loading goes through the model's sanitize."""
    folder = Path(folder)
    if hf_names:
        model = _renamed(model)
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        save_model(tmp, model, donate_model=donate_model)
        save_config(dict(config), tmp / "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    return folder


def _renamed(model: nn.Module) -> nn.Module:
    """`model`'s own layers (quantized ones included, so save_model counts their parameters
    right) under transformers' names, the fused projections as transformers' single ones."""
    import copy

    from .checkpoint import FUSED, hf_name

    leaves = tree_flatten(model.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Module))
    single = []
    for path, layer in leaves:
        fused = next((f for f in FUSED if path.endswith("." + f)), None)
        if fused is None:
            single.append((path, layer))
            continue
        start, prefix = 0, path[: -len(fused)]
        for part, rows in zip(FUSED[fused], model.part_rows[fused]):
            piece = copy.copy(layer)
            for name, value in layer.items():
                if isinstance(value, mx.array):
                    piece[name] = value[start : start + rows]
            single.append((prefix + part, piece))
            start += rows
    renamed = nn.Module()
    for name, value in tree_unflatten([(hf_name(path + ".")[:-1], layer) for path, layer in single]).items():
        renamed[name] = value
    return renamed


def byte_level_tokenizer(vocab_size: int, texts=()):
    """Byte-level BPE in the GPT-NeoX layout: <|endoftext|> = 0 (BOS/EOS/UNK), <|padding|> = 1,
    then the 256 bytes, then merges learnt from `texts` up to `vocab_size` (258: bytes only).
    Returns transformers' PreTrainedTokenizerFast (save_pretrained writes what mlx_lm.load reads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|padding|>",
    )
