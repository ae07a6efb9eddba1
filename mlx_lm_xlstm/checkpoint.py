"""Checkpoint names and checks: transformers' xLSTM-7b names, the fused weight layout, and
the errors about missing, unexpected or misshaped tensors (both architectures)."""

import mlx.core as mx
import mlx.nn as nn

# transformers' names -> ours, which follow mlx-lm's (`layers.N.` for pipeline loading,
# `down_proj`/`v_proj` for the mixed quantization recipes).
HF_TO_MLX = {
    "backbone.blocks.": "backbone.layers.",
    ".mlstm_layer.q.": ".mlstm_layer.q_proj.",
    ".mlstm_layer.k.": ".mlstm_layer.k_proj.",
    ".mlstm_layer.v.": ".mlstm_layer.v_proj.",
    ".ffn.proj_up_gate.": ".ffn.gate_proj.",
    ".ffn.proj_up.": ".ffn.up_proj.",
    ".ffn.proj_down.": ".ffn.down_proj.",
}


# NX-AI's xLSTMLarge keeps its embedding outside the backbone, transformers inside.
XLSTM_LARGE_TO_HF = {"embedding.weight": "backbone.embeddings.weight"}


def mlx_name(key: str) -> str:
    key = XLSTM_LARGE_TO_HF.get(key, key)
    for hf, ours in HF_TO_MLX.items():
        key = key.replace(hf, ours)
    return key


def hf_name(key: str) -> str:
    for hf, ours in HF_TO_MLX.items():
        key = key.replace(ours, hf)
    return key


def split_fused(args, weights: dict) -> dict:
    """weight_mode 'fused' -> the single layout (one way to hold the weights)."""
    splits = {
        "mlstm_layer.qkv_opreact": (
            ["q", "k", "v", "ogate_preact"],
            [args.qk_dim, 2 * args.qk_dim, 2 * args.qk_dim + args.v_dim],
        ),
        "mlstm_layer.ifgate_preact": (["igate_preact", "fgate_preact"], [args.num_heads]),
        "ffn.proj_up_gate_z": (["proj_up_gate", "proj_up"], [args.ffn_dim]),
    }
    out = {}
    for key, value in weights.items():
        for fused, (names, cuts) in splits.items():
            if f".{fused}." in key:
                prefix, param = key.split(f".{fused}.")
                parent = fused.rsplit(".", 1)[0]
                for name, part in zip(names, mx.split(value, cuts, axis=0)):
                    out[f"{prefix}.{parent}.{name}.{param}"] = part
                break
        else:
            out[key] = value
    return out


def check_weights(model: nn.Module, weights: dict, as_in_checkpoint=str):
    """Name the tensor that is missing, unexpected or misshaped, before mlx-lm's strict load."""
    from mlx.utils import tree_flatten

    expected = dict(tree_flatten(model.parameters()))
    quantized = {k.rsplit(".", 1)[0] for k in weights if k.endswith(".scales")}
    module_of = lambda k: k.rsplit(".", 1)[0]
    missing = [as_in_checkpoint(k) for k in expected if k not in weights]
    unexpected = [
        as_in_checkpoint(k) for k in weights
        if k not in expected and not (module_of(k) in quantized and k.endswith((".scales", ".biases")))
    ]
    if missing or unexpected:
        raise ValueError(
            "xLSTM checkpoint does not match its config: "
            + (f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}" if unexpected else "")
        )
    for key, param in expected.items():
        if module_of(key) in quantized:
            continue
        if tuple(weights[key].shape) != tuple(param.shape):
            raise ValueError(
                f"xLSTM checkpoint: tensor '{as_in_checkpoint(key)}' has shape {tuple(weights[key].shape)}, "
                f"the config implies {tuple(param.shape)}"
            )


def report_unquantized(model: nn.Module, weights: dict):
    """mlx-lm's quantize leaves a layer in float, without a word, when the group size does
    not divide its input width (the FFN down projection of xLSTM-7b: 10944 = 171 x 64, so
    at group 128). Say so on load (python -m mlx_lm_xlstm.convert says it when converting)."""
    import warnings

    message = unquantized_message(model, weights)
    if message:
        warnings.warn(message, stacklevel=2)


def unquantized_message(model: nn.Module, weights: dict):
    """One line naming the layers that quantized `weights` leave in float and the group sizes
    that would quantize them, or None."""
    import re

    scales = {k[: -len(".scales")]: v for k, v in weights.items() if k.endswith(".scales")}
    if not scales:
        return None
    linears = {p: m for p, m in model.named_modules() if hasattr(m, "to_quantized")}
    path, s = next(iter(scales.items()))
    group_size = linears[path].weight.shape[-1] // s.shape[-1]
    skipped = {
        p: m.weight.shape[-1] for p, m in linears.items()
        if p not in scales and m.weight.shape[-1] % group_size
    }
    if not skipped:
        return None
    widths = sorted(set(skipped.values()))
    fits = [g for g in (128, 64, 32) if all(w % g == 0 for w in widths)]
    names = sorted({re.sub(r"\.layers\.\d+\.", ".layers.*.", p) for p in skipped})
    return (
        f"xLSTM: {len(skipped)} layers stay unquantized ({', '.join(names)}): their input "
        f"width {widths} is not a multiple of the group size {group_size}"
        + (f"; --q-group-size {' or '.join(map(str, fits))} quantizes them too" if fits else "")
    )
