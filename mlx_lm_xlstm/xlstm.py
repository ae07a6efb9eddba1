"""The module mlx-lm imports as `mlx_lm.models.xlstm`.

One model type, two architectures: xLSTM-7b ("large", mLSTM blocks) and the paper's
sLSTM/mLSTM block stack, told apart by the config (the paper's has `mlstm_block`/`slstm_block`).
"""

from . import hf_config, large  # noqa: F401  (hf_config: see its docstring)

# Base checkpoints ship no chat template: mlx-lm then uses chat_template.py (aliased by the hook).
# No eos default: large.ModelArgs.from_dict sets xLSTM-7b's, paper models keep their tokenizer's.
TOKENIZER_DEFAULTS = {"chat_template_type": "xlstm"}


def _is_paper(config: dict) -> bool:
    return "mlstm_block" in config or "slstm_block" in config


class ModelArgs(large.ModelArgs):
    @classmethod
    def from_dict(cls, params: dict):
        if _is_paper(params):
            from . import paper

            return paper.ModelArgs.from_dict(params)
        return large.ModelArgs.from_dict(params)


def Model(args):
    """mlx-lm builds `Model(ModelArgs.from_dict(config))`; the args say which architecture."""
    if isinstance(args, large.ModelArgs):
        return large.Model(args)
    from . import paper

    return paper.Model(args)
