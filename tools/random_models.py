"""Random-weight models and model folders for the benchmarks (no download): xLSTM at the
project's shapes, "7b" being xLSTM-7b's real config.json (tools/xlstm_7b_config.json), and a
llama of the same size as the baseline that mlx-lm users know.

    python tools/random_models.py DIR --shape 7b     # DIR/xlstm and DIR/llama, bf16

Folders are written by `mlx_lm_xlstm.save.save_checkpoint` (the xLSTM under transformers'
tensor names, so loading goes through `sanitize` as for the real checkpoint) with one
byte-level tokenizer shared by both models.
"""

import argparse
import json
import sys
import sysconfig
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_map_with_path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {
    # Enough heads and width for 2 ranks, and groups of 32 that split: v_dim 64 -> 2, FFN 192 -> 6.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_heads=4, vocab_size=320, chunk_size=16),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_heads=4, vocab_size=2048),
    # xLSTM-7b (NX-AI/xLSTM-7b config.json); the rest of the config as in that file.
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_heads=8, vocab_size=50304),
}
# Llama-2-7b's shape (vocab as the xLSTM's, so one tokenizer serves both); small ones alike.
LLAMA_SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192, vocab_size=320),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=704, vocab_size=2048),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008, vocab_size=50304),
}
XLSTM_7B_CONFIG = Path(__file__).resolve().parent / "xlstm_7b_config.json"
TOKENIZER_VOCAB = 2048


def xlstm_config(shape: str) -> dict:
    """config.json of the xLSTM at `shape`: the real one for 7b."""
    if shape == "7b":
        return json.loads(XLSTM_7B_CONFIG.read_text())
    return {
        "model_type": "xlstm", "architectures": ["xLSTMForCausalLM"], "ffn_round_up_to_multiple_of": 64,
        "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 0, "force_bos_token_insert": True,
        **SHAPES[shape],
    }


def llama_config(shape: str) -> dict:
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 0, **LLAMA_SHAPES[shape],
    }


def random_xlstm(config: dict, dtype=mx.bfloat16, seed: int = 0):
    """mlx_lm_xlstm's xLSTM-7b architecture with random weights of trained-like scale; the
    gate projections stay fp32, as mlx-lm's --dtype leaves them."""
    from mlx_lm_xlstm import large

    model = large.Model(large.ModelArgs.from_dict(dict(config)))
    mx.random.seed(seed)
    cast = model.cast_predicate

    def init(name, p):
        if "norm" in name:
            w = 1.0 + 0.1 * mx.random.normal(p.shape)
        elif name.endswith("if_gate_preact.bias"):  # input gates, then forget gates: mostly open, long memory
            H = p.shape[0] // 2
            w = mx.concatenate([0.1 * mx.random.normal((H,)), 3.0 + mx.random.normal((H,))])
        elif name.endswith("bias"):
            w = 0.1 * mx.random.normal(p.shape)
        elif "embeddings" in name:
            w = mx.random.normal(p.shape)
        else:
            w = mx.random.normal(p.shape) * p.shape[-1] ** -0.5
        return w.astype(dtype if cast(name) else mx.float32)

    model.update(tree_map_with_path(init, model.parameters()))
    return model


def random_llama(config: dict, dtype=mx.bfloat16, seed: int = 0):
    from mlx_lm.models import llama

    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(dict(config)))
    model.set_dtype(dtype)
    return model


def training_text(limit: int = 200_000) -> str:
    """Text every Python install has: the standard library's own source."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    parts = [(lib / n).read_text(encoding="utf-8") for n in ("textwrap.py", "difflib.py", "argparse.py")]
    return "\n".join(parts)[:limit]


def tokenizer(vocab_size: int):
    from mlx_lm_xlstm.save import byte_level_tokenizer

    return byte_level_tokenizer(min(vocab_size, TOKENIZER_VOCAB), [training_text()])


def write_xlstm(path, shape: str, dtype="bfloat16", q_bits=None, q_group_size=None, seed=0, tok=None):
    """A loadable xLSTM folder (transformers' tensor names), quantized by mlx-lm's
    quantize_model when q_bits is given."""
    from mlx_lm.utils import quantize_model
    from mlx_lm_xlstm.save import save_checkpoint

    config = xlstm_config(shape)
    model = random_xlstm(config, getattr(mx, dtype), seed)
    if q_bits:
        model, config = quantize_model(model, config, q_group_size, q_bits)
    tok = tok or tokenizer(config["vocab_size"])
    return save_checkpoint(path, model, config, tokenizer=tok, hf_names=True, overwrite=True, donate_model=True)


def write_llama(path, shape: str, dtype="bfloat16", seed=0, tok=None):
    from mlx_lm_xlstm.save import save_checkpoint

    config = llama_config(shape)
    model = random_llama(config, getattr(mx, dtype), seed)
    tok = tok or tokenizer(config["vocab_size"])
    return save_checkpoint(path, model, config, tokenizer=tok, overwrite=True, donate_model=True)


def write_pair(folder, shape: str, dtype="bfloat16"):
    """folder/xlstm and folder/llama, one tokenizer; skips a folder that is already there."""
    folder = Path(folder)
    tok = tokenizer(SHAPES[shape]["vocab_size"])
    if not (folder / "xlstm" / "config.json").exists():
        write_xlstm(folder / "xlstm", shape, dtype, tok=tok)
    if not (folder / "llama" / "config.json").exists():
        write_llama(folder / "llama", shape, dtype, tok=tok)
    return folder / "xlstm", folder / "llama"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir")
    p.add_argument("--shape", choices=SHAPES, default="tiny")
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args()
    for path in write_pair(a.dir, a.shape, a.dtype):
        print(path)


if __name__ == "__main__":
    main()
