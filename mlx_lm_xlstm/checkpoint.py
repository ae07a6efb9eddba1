"""Checkpoint names and checks: transformers' xLSTM-7b names, the model's fused projections,
and the errors about missing, unexpected or misshaped tensors (both architectures)."""

import mlx.core as mx
import mlx.nn as nn

# transformers' names -> ours, which follow mlx-lm's (`layers.N.` for pipeline loading,
# `down_proj` for the mixed quantization recipes). The single projections get the names our
# earlier conversions saved them under; FUSED then joins them into the model's.
HF_TO_MLX = {
    "backbone.blocks.": "backbone.layers.",
    ".mlstm_layer.q.": ".mlstm_layer.q_proj.",
    ".mlstm_layer.k.": ".mlstm_layer.k_proj.",
    ".mlstm_layer.v.": ".mlstm_layer.v_proj.",
    ".ffn.proj_up_gate.": ".ffn.gate_proj.",
    ".ffn.proj_up.": ".ffn.up_proj.",
    ".ffn.proj_down.": ".ffn.down_proj.",
    # weight_mode "fused" (transformers and NX-AI): already our fused layout, by other names
    ".mlstm_layer.qkv_opreact.": ".mlstm_layer.qkvo_proj.",
    ".mlstm_layer.ifgate_preact.": ".mlstm_layer.if_gate_preact.",
    ".ffn.proj_up_gate_z.": ".ffn.gate_up_proj.",
}

# The model's fused projections and the single ones they hold, in row order: one matmul
# instead of four (q, k, v, output gate), two (input and forget gates) and two (FFN).
FUSED = {
    "mlstm_layer.qkvo_proj": ("mlstm_layer.q_proj", "mlstm_layer.k_proj", "mlstm_layer.v_proj", "mlstm_layer.ogate_preact"),
    "mlstm_layer.if_gate_preact": ("mlstm_layer.igate_preact", "mlstm_layer.fgate_preact"),
    "ffn.gate_up_proj": ("ffn.gate_proj", "ffn.up_proj"),
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


def fuse_projections(model: nn.Module, weights: dict, as_in_checkpoint=str) -> dict:
    """The single projections (transformers' weight_mode 'single', our earlier conversions)
    joined into the model's fused ones (FUSED), quantized ones too (weight, scales and
    biases row by row); fused ones pass as they are. `model.part_rows[fused]`: each part's
    rows as the config implies them; a part of another shape is named as the checkpoint
    names it."""
    from mlx.utils import tree_flatten

    expected = dict(tree_flatten(model.parameters()))
    quantized = {k.rsplit(".", 1)[0] for k in weights if k.endswith(".scales")}
    groups, out = {}, {}
    for key, value in weights.items():
        module, param = key.rsplit(".", 1)
        for fused, parts in FUSED.items():
            part = next((p for p in parts if module.endswith("." + p)), None)
            if part is not None:
                groups.setdefault((module[: -len(part)], fused, param), {})[part] = value
                break
        else:
            out[key] = value
    for (prefix, fused, param), found in groups.items():
        names = {p: as_in_checkpoint(f"{prefix}{p}.{param}") for p in FUSED[fused]}
        missing = [name for p, name in names.items() if p not in found]
        if missing:
            raise ValueError(f"xLSTM checkpoint does not match its config: missing tensors {missing}")
        values = [found[p] for p in FUSED[fused]]
        fused_key = f"{prefix}{fused}.{param}"
        for part, rows, v in zip(FUSED[fused], model.part_rows[fused], values):
            float_part = fused_key in expected and f"{prefix}{part}" not in quantized
            implied = (rows, *(expected[fused_key].shape[1:] if float_part else v.shape[1:]))
            if tuple(v.shape) != implied:
                raise ValueError(
                    f"xLSTM checkpoint: tensor '{names[part]}' has shape {tuple(v.shape)}, the config implies {implied}"
                )
        if len({v.dtype for v in values}) > 1:
            raise ValueError(
                f"xLSTM checkpoint: {list(names.values())} have different dtypes "
                f"{[str(v.dtype) for v in values]}, but the model holds them as one matrix ({prefix}{fused})"
            )
        out[fused_key] = mx.concatenate(values, axis=0)
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
