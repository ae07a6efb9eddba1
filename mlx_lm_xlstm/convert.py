"""mlx-lm's `convert` that never leaves a half-written folder.

    python -m mlx_lm_xlstm.convert --hf-path NX-AI/xLSTM-7b --mlx-path xlstm-7b-4bit -q

The options are mlx_lm.convert's own. mlx-lm writes straight into --mlx-path, so a conversion
that fails or is interrupted leaves a folder that looks like a model; here the model is written
into a temporary folder beside --mlx-path and renamed into place once complete.
"""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from mlx_lm.convert import configure_parser, convert as mlx_lm_convert
from mlx_lm.utils import upload_to_hub


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


def convert(mlx_path: str = "mlx_model", upload_repo: str = None, **kwargs):
    """mlx_lm.convert's arguments; uploads (if asked) from the finished folder."""
    with atomic_folder(mlx_path) as tmp:
        mlx_lm_convert(mlx_path=str(tmp), **kwargs)
    if upload_repo is not None:
        upload_to_hub(mlx_path, upload_repo)


def main():
    args = configure_parser().parse_args()
    convert(**vars(args))


if __name__ == "__main__":
    main()
