"""Lets transformers parse xLSTM-7b's config.json, which mlx-lm's tokenizer loader reads via AutoConfig.

The checkpoint names NX-AI's Triton kernels (`chunkwise--triton_xl_chunk`, ...), which
transformers' strict xLSTMConfig rejects unless NX-AI's `xlstm` package is installed; without
this, `mlx_lm.load("NX-AI/xLSTM-7b")` fails in the tokenizer. Our model never reads those fields.
"""

from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, xLSTMConfig

KERNEL_FIELDS = ("chunkwise_kernel", "sequence_kernel", "step_kernel")


class TolerantXLSTMConfig(xLSTMConfig):
    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        try:
            return super().from_dict(config_dict, **kwargs)
        except StrictDataclassError:
            kept = {k: v for k, v in config_dict.items() if k not in KERNEL_FIELDS}
            return super().from_dict(kept, **kwargs)


AutoConfig.register("xlstm", TolerantXLSTMConfig, exist_ok=True)
