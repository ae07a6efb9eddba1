"""What an xLSTM model folder holds, and how fast it can decode at best.

    python -m mlx_lm_xlstm.info MODEL_DIR [--bandwidth-gbs 400 800]
    python -m mlx_lm_xlstm.info tools/xlstm_7b_config.json --dtype bfloat16 --bits 4

MODEL is a model folder or a config.json alone (config-only: sizes are predicted from the
dims). Decode reads every weight once per token (the embedding table only one row) and the
recurrent state twice (read and write), so tok/s <= bandwidth / those bytes.
Nothing is materialised: the model is built lazily and never evaluated.
"""

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.convert import MODEL_CONVERSION_DTYPES as DTYPES
from mlx_lm.models.cache import ArraysCache
from mlx_lm.utils import quantize_model

from . import xlstm


def read_config(path) -> dict:
    """config.json of a model folder, or a config file given directly."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no model folder with a config.json, nor a config file")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    if config.get("model_type") != "xlstm":
        raise ValueError(f"{file}: model_type is {config.get('model_type')!r}, expected 'xlstm'")
    return config


def safetensors_bytes(folder: Path) -> dict:
    """Tensor name -> (dtype, bytes) of a folder's safetensors (mx.load is lazy: headers only)."""
    tensors = {}
    for file in sorted(folder.glob("model*.safetensors")):
        for name, a in mx.load(str(file)).items():
            tensors[name] = (dtype_name(a.dtype), a.nbytes)
    return tensors


def dtype_name(dtype) -> str:
    return str(dtype).split(".")[-1]


def skeleton(config: dict, dtype: str = None, quantization: dict = None):
    """The model as mlx-lm would hold it (cast as `convert --dtype` casts, quantized as the
    config's `quantization` says), built lazily: shapes and dtypes only."""
    model = xlstm.Model(xlstm.ModelArgs.from_dict(dict(config)))
    if dtype:
        keep = getattr(model, "cast_predicate", lambda path: True)
        model.update(
            tree_map_with_path(
                lambda path, v: v.astype(getattr(mx, dtype)) if keep(path) and mx.issubdtype(v.dtype, mx.floating) else v,
                model.parameters(),
            )
        )
    if quantization:
        # A per-layer entry (mixed recipes) wins, as in the config mlx-lm writes.
        default = getattr(model, "quant_predicate", lambda path, module: True)
        predicate = lambda path, module: quantization[path] if path in quantization else default(path, module)
        with contextlib.redirect_stdout(io.StringIO()):  # its bits-per-weight line
            quantize_model(model, {}, quantization["group_size"], quantization["bits"],
                           mode=quantization.get("mode", "affine"), quant_predicate=predicate)
    return model


def block_kinds(model) -> list:
    """mLSTM or sLSTM, per block."""
    slstm_at = getattr(model.args, "slstm_at", [])
    return ["sLSTM" if i in slstm_at else "mLSTM" for i in range(len(model.layers))]


def state_blocks(model) -> list:
    """Per kind of block, how many there are and the cache arrays one sequence carries in each
    (from one lazy decode step). The state alone: ArraysCache's nbytes, not an UndoableCache's,
    which adds the undo window of speculative decoding."""
    cache = model.make_cache()
    model(mx.zeros((1, 1), mx.int32), cache)
    groups = {}
    for kind, c in zip(block_kinds(model), cache):
        arrays = [dict(shape=list(a.shape), dtype=dtype_name(a.dtype), bytes=a.nbytes)
                  for a in c.cache if a is not None]
        group = groups.setdefault(kind, dict(kind=kind, count=0, bytes=ArraysCache.nbytes.fget(c), arrays=arrays))
        group["count"] += 1
    return list(groups.values())


def architecture(args) -> dict:
    if hasattr(args, "qk_dim"):  # xLSTM-7b ("large")
        H = args.num_heads
        return dict(
            kind="large (xLSTM-7b mLSTM blocks)", blocks=args.num_hidden_layers, heads=H,
            hidden_size=args.hidden_size, qk_head_dim=args.qk_dim // H, v_head_dim=args.v_dim // H,
            ffn_dim=args.ffn_dim, vocab_size=args.vocab_size, chunk_size=args.chunk_size,
        )
    fields = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list)) and not k.startswith("_")}
    return dict(kind="paper (sLSTM/mLSTM block stack)", **fields)


def describe(path, dtype: str = None, quantization: dict = None) -> dict:
    """Architecture, sizes and state of the model at `path` (a folder or a config file).

    `dtype`/`quantization` ask what a conversion would give (config-only prediction);
    without them a folder's own safetensors are measured."""
    path = Path(path)
    config = read_config(path)
    quantization = quantization or config.get("quantization")
    stored = safetensors_bytes(path) if path.is_dir() and not dtype and quantization is config.get("quantization") else {}
    dtype = dtype or config.get("torch_dtype") or config.get("dtype") or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")

    plain = xlstm.Model(xlstm.ModelArgs.from_dict(dict(config)))
    model = skeleton(config, None if stored else dtype, None if stored else quantization)
    embedding = next(p for p, m in plain.named_modules() if isinstance(m, nn.Embedding))
    if stored:
        weight_bytes = sum(b for _, b in stored.values())
        embedding_bytes = sum(b for k, (_, b) in stored.items() if k.startswith(embedding + "."))
        by_dtype = {}
        for t, b in stored.values():
            by_dtype[t] = by_dtype.get(t, 0) + b
    else:
        params = tree_flatten(model.parameters())
        weight_bytes = sum(v.nbytes for _, v in params)
        embedding_bytes = sum(v.nbytes for k, v in params if k.startswith(embedding + "."))
        by_dtype = {}
        for _, v in params:
            by_dtype[dtype_name(v.dtype)] = by_dtype.get(dtype_name(v.dtype), 0) + v.nbytes
    vocab = plain.args.vocab_size
    state = state_blocks(plain)
    state_bytes = sum(b["count"] * b["bytes"] for b in state)
    token_bytes = weight_bytes - embedding_bytes + embedding_bytes // vocab + 2 * state_bytes
    return dict(
        path=str(path),
        source="safetensors" if stored else "config",
        architecture=architecture(plain.args),
        parameters=sum(v.size for _, v in tree_flatten(plain.parameters())),
        dtype=dtype,
        bytes_by_dtype=by_dtype,
        quantization=quantization,
        weight_bytes=weight_bytes,
        embedding_bytes=embedding_bytes,
        state_bytes=state_bytes,
        state_blocks=state,
        bytes_per_token=token_bytes,
    )


def decode_bound(info: dict, bandwidth_gbs: float) -> float:
    """Upper bound of decode tokens/s at `bandwidth_gbs` GB/s (batch 1)."""
    return bandwidth_gbs * 1e9 / info["bytes_per_token"]


def describe_quantization(q) -> str:
    if not q:
        return "none"
    layers = {k: v for k, v in q.items() if isinstance(v, (dict, bool))}
    text = f"{q.get('mode', 'affine')} {q['bits']}-bit, group size {q['group_size']}"
    if layers:
        counts = {}
        for v in layers.values():
            key = f"{v['bits']}-bit" if isinstance(v, dict) else ("default" if v else "kept float")
            counts[key] = counts.get(key, 0) + 1
        text += " (per layer: " + ", ".join(f"{n} at {k}" for k, n in sorted(counts.items())) + ")"
    return text


def human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f} {unit}"
    return f"{n} B"


def report(info: dict, bandwidths=(400.0,)) -> str:
    a = info["architecture"]
    gb = human_bytes
    mib = lambda b: f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.2f} KiB"
    arch = ", ".join(f"{k} {v}" for k, v in a.items() if k != "kind")
    lines = [
        f"model:          {info['path']}  (sizes from {info['source']})",
        f"architecture:   {a['kind']}: {arch}",
        f"parameters:     {info['parameters']:,}",
        f"dtype:          {info['dtype']}  (bytes by dtype: "
        + ", ".join(f"{k} {gb(v)}" for k, v in sorted(info["bytes_by_dtype"].items())) + ")",
        f"quantization:   {describe_quantization(info['quantization'])}",
        f"weight bytes:   {gb(info['weight_bytes'])} ({info['weight_bytes']:,} B; embedding table {gb(info['embedding_bytes'])})",
        f"state/sequence: {mib(info['state_bytes'])} ({info['state_bytes']:,} B) = "
        + " + ".join(
            f"{b['count']} {b['kind']} block{'s' * (b['count'] != 1)} x ("
            + " + ".join(f"{'x'.join(map(str, s['shape']))} {s['dtype']}" for s in b["arrays"]) + ")"
            for b in info["state_blocks"]
        ),
        f"read per token: {gb(info['bytes_per_token'])} (weights without the embedding table, one embedding row, state read + write)",
    ]
    for bw in bandwidths:
        lines.append(f"decode bound:   {decode_bound(info, bw):,.1f} tok/s at {bw:g} GB/s")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m mlx_lm_xlstm.info", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="model folder, or a config.json alone")
    parser.add_argument("--bandwidth-gbs", type=float, nargs="+", default=[400.0], help="memory bandwidth(s) in GB/s")
    parser.add_argument("--dtype", choices=DTYPES, help="predict for weights cast to this dtype")
    parser.add_argument("--bits", type=int, help="predict for weights quantized to this many bits")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--mode", default="affine", choices=["affine", "mxfp4", "mxfp8", "nvfp4"])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = parser.parse_args(argv)
    quantization = dict(group_size=a.group_size, bits=a.bits, mode=a.mode) if a.bits else None
    try:
        info = describe(a.model, a.dtype, quantization)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    if a.json:
        info["decode_bound_tok_s"] = {str(bw): decode_bound(info, bw) for bw in a.bandwidth_gbs}
        print(json.dumps(info, indent=2))
    else:
        print(report(info, a.bandwidth_gbs))


if __name__ == "__main__":
    main(sys.argv[1:])
