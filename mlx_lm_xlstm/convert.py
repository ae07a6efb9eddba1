"""mlx-lm's `convert` that never leaves a half-written folder, reads NPZ weights too, and uploads
this plugin's model card.

    python -m mlx_lm_xlstm.convert --hf-path NX-AI/xLSTM-7b --mlx-path xlstm-7b-4bit -q

The options are mlx_lm.convert's own. mlx-lm writes straight into --mlx-path, so a conversion
that fails or is interrupted leaves a folder that looks like a model; here the model is written
into a temporary folder beside --mlx-path and renamed into place once complete. A local
--hf-path may hold its weights (transformers' names) in .npz files instead of safetensors.
--upload-repo uploads the card of mlx_lm_xlstm/card.py (how to install the plugin and run the
model), not mlx-lm's generic one. A quantization that leaves layers in float says which.
"""

import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from mlx_lm.convert import configure_parser, convert as mlx_lm_convert


@contextmanager
def atomic_folder(path, overwrite: bool = False):
    """Yields a path to build the folder `path` at; it is renamed to `path` when the block
    completes and removed if the block raises (KeyboardInterrupt included)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(
            f"Cannot save to the path {path} as it already exists."
            " Please delete the file/directory or specify a new path to save to."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    # In the same parent, so the final rename stays on one filesystem. The yielded path is a
    # child that does not exist yet: mlx-lm refuses existing paths, and mkdtemp's folder is 0700.
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield tmp / path.name
        if overwrite and path.exists():
            shutil.rmtree(path)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def safetensors_source(hf_path: str, scratch: Path) -> str:
    """`hf_path`, or for a local folder whose weights are .npz files, a view of it under `scratch`
    (its other files linked, the arrays rewritten as safetensors: mlx-lm's loader reads those only)."""
    folder = Path(hf_path)
    if not folder.is_dir():
        return hf_path  # a Hub repo id: mlx-lm downloads it
    if any(folder.glob("*.safetensors")):
        return hf_path
    npz = sorted(folder.glob("*.npz"))
    if not npz:
        raise ValueError(f"{folder}: no weights found: expected *.safetensors or *.npz files")
    import mlx.core as mx

    view = scratch / "npz-source"
    view.mkdir()
    for file in folder.iterdir():
        if file.suffix != ".npz":
            (view / file.name).symlink_to(file.resolve())
    for n, file in enumerate(npz):
        mx.save_safetensors(str(view / f"model-{n:05d}-of-{len(npz):05d}.safetensors"), mx.load(str(file)))
    return str(view)


def unquantized_note(folder: Path):
    """What the quantization left in float (mlx-lm skips, silently, layers whose input width
    the group size does not divide), or None."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "xlstm" or "quantization" not in config:
        return None
    import mlx.core as mx

    from . import xlstm
    from .checkpoint import unquantized_message

    weights = {k: v for f in sorted(folder.glob("model*.safetensors")) for k, v in mx.load(str(f)).items()}
    return unquantized_message(xlstm.Model(xlstm.ModelArgs.from_dict(config)), weights)


def upload(folder, upload_repo: str, hf_path: str):
    """Our card, then the folder. The base model and license are the source's: a local source's
    own card, or what mlx-lm's card took from the Hub repo."""
    from huggingface_hub import HfApi, ModelCard

    from . import info
    from .card import model_card, weights_description

    folder = Path(folder)
    local_card = Path(hf_path) / "README.md"
    source = ModelCard.load(local_card if local_card.is_file() else folder / "README.md").data
    license_meta = {k: source.get(k) for k in ("license", "license_name", "license_link") if source.get(k)}
    base_model = None if Path(hf_path).exists() else hf_path
    described = info.describe(folder)
    bits = [f"{described['quantization']['bits']}-bit"] if described["quantization"] else []
    card = model_card(upload_repo, described, weights_description(described), base_model, license_meta, tags=bits)
    card.save(folder / "README.md")
    api = HfApi()
    api.create_repo(repo_id=upload_repo, exist_ok=True)
    api.upload_large_folder(folder_path=str(folder), repo_id=upload_repo, repo_type="model")
    print(f"Upload successful, go to https://huggingface.co/{upload_repo} for details.")


def convert(hf_path: str, mlx_path: str = "mlx_model", upload_repo: str = None, **kwargs):
    """mlx_lm.convert's arguments; uploads (if asked) from the finished folder."""
    with atomic_folder(mlx_path) as tmp:
        mlx_lm_convert(hf_path=safetensors_source(hf_path, tmp.parent), mlx_path=str(tmp), **kwargs)
        if note := unquantized_note(tmp):
            print(f"[WARNING] {note}", file=sys.stderr)
    if upload_repo is not None:
        upload(mlx_path, upload_repo, hf_path)


def main():
    parser = configure_parser()
    try:
        convert(**vars(parser.parse_args()))
    except ValueError as e:  # bad input: the message says what is wrong
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
