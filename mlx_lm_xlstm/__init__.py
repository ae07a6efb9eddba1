"""xLSTM for mlx-lm. Installing the package registers the `xlstm` model type;
importing it by hand (e.g. under `python -S`) does the same."""

from . import _hook  # noqa: F401  (importing it registers the model type)

__version__ = "0.1.0"
