"""The paper's xLSTM (Beck et al. 2024): NX-AI `xlstm` package's xLSTMLMModel in MLX."""

from .model import Model, ModelArgs

__all__ = ["Model", "ModelArgs"]
