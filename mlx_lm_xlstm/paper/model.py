"""The paper's xLSTM language model (Beck et al. 2024; NX-AI `xlstm.xLSTMLMModel`):
token embedding, xLSTMBlockStack of mLSTM blocks with sLSTM blocks at `slstm_at`,
post-blocks LayerNorm, LM head (tied or not).

Checkpoint: config.json = {"model_type": "xlstm", **asdict(xLSTMLMModelConfig)}, weights =
the xLSTMLMModel state_dict under its own names.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs

from ..checkpoint import check_weights
from ..distributed import BlockPipeline, check_split_inputs
from ..recurrent import RecurrentModel
from .components import _ACTIVATIONS, GatedFeedForward, LayerNorm, proj_up_dim, small_init
from .mlstm_block import mLSTMLayer
from .slstm import NUM_GATES, sLSTMLayer


@dataclass
class mLSTMLayerArgs:
    conv1d_kernel_size: int = 4
    qkv_proj_blocksize: int = 4
    num_heads: int = 4
    proj_factor: float = 2.0
    round_proj_up_dim_up: bool = True
    round_proj_up_to_multiple_of: int = 64


@dataclass
class sLSTMLayerArgs:
    num_heads: int = 4
    conv1d_kernel_size: int = 4
    group_norm_weight: bool = True
    # Which backend wrote the checkpoint: it fixes the layout of the recurrent kernel and bias.
    backend: str = "cuda"
    function: str = "slstm"


@dataclass
class FeedForwardArgs:
    proj_factor: float = 1.3
    act_fn: str = "gelu"
    bias: bool = False
    dropout: float = 0.0
    ff_type: str = "ffn_gated"
    round_proj_up_dim_up: bool = True
    round_proj_up_to_multiple_of: int = 64


@dataclass
class mLSTMBlockArgs:
    mlstm: mLSTMLayerArgs = field(default_factory=mLSTMLayerArgs)


@dataclass
class sLSTMBlockArgs:
    slstm: sLSTMLayerArgs = field(default_factory=sLSTMLayerArgs)
    feedforward: Optional[FeedForwardArgs] = field(default_factory=FeedForwardArgs)


# The dataclass of each nested block config.
_NESTED = {
    mLSTMBlockArgs: {"mlstm": mLSTMLayerArgs},
    sLSTMBlockArgs: {"slstm": sLSTMLayerArgs, "feedforward": FeedForwardArgs},
}


def _parse(cls, value, where: str):
    """A nested config dict -> its dataclass. Keys the model does not need (sizes derived
    from others, dtypes, kernel options) are dropped, as mlx-lm drops unknown top-level keys."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"xLSTM config: '{where}' must be a dict, got {type(value).__name__}")
    nested = _NESTED.get(cls, {})
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in value:
            sub = value[f.name]
            kwargs[f.name] = _parse(nested[f.name], sub, f"{where}.{f.name}") if f.name in nested else sub
    return cls(**kwargs)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "xlstm"
    mlstm_block: Optional[mLSTMBlockArgs] = None
    slstm_block: Optional[sLSTMBlockArgs] = None
    context_length: int = -1
    num_blocks: int = 1
    embedding_dim: int = 128
    add_post_blocks_norm: bool = True
    bias: bool = False
    dropout: float = 0.0
    slstm_at: Union[List[int], str] = field(default_factory=list)
    vocab_size: int = -1
    tie_weights: bool = False
    weight_decay_on_embedding: bool = False
    add_embedding_dropout: bool = False

    def __post_init__(self):
        self.mlstm_block = _parse(mLSTMBlockArgs, self.mlstm_block, "mlstm_block")
        self.slstm_block = _parse(sLSTMBlockArgs, self.slstm_block, "slstm_block")
        for name in ("vocab_size", "num_blocks", "embedding_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"xLSTM config: {name} must be positive, got {getattr(self, name)}")
        if self.mlstm_block is None and self.slstm_block is None:
            raise ValueError("xLSTM config: needs 'mlstm_block' and/or 'slstm_block'")
        if self.mlstm_block is None or self.slstm_at == "all":
            self.slstm_at = list(range(self.num_blocks))
        self.slstm_at = list(self.slstm_at)
        if any(not 0 <= i < self.num_blocks for i in self.slstm_at):
            raise ValueError(f"xLSTM config: slstm_at {self.slstm_at} outside 0..{self.num_blocks - 1}")
        if self.slstm_at and self.slstm_block is None:
            raise ValueError(f"xLSTM config: slstm_at {self.slstm_at} but no 'slstm_block'")
        if len(self.slstm_at) < self.num_blocks and self.mlstm_block is None:
            raise ValueError("xLSTM config: mLSTM blocks in the stack but no 'mlstm_block'")
        if self.mlstm_block is not None:
            self._check_mlstm(self.mlstm_block.mlstm)
        if self.slstm_block is not None:
            self._check_slstm(self.slstm_block)

    def _check_mlstm(self, m: mLSTMLayerArgs):
        inner = self.mlstm_inner_dim
        for name, n in (("num_heads", m.num_heads), ("qkv_proj_blocksize", m.qkv_proj_blocksize)):
            if n < 1 or inner % n:
                raise ValueError(f"xLSTM config: mlstm {name} {n} does not divide the inner dim {inner}")
        if m.conv1d_kernel_size < 1:
            raise ValueError("xLSTM config: the mLSTM block needs conv1d_kernel_size >= 1")

    def _check_slstm(self, s: sLSTMBlockArgs):
        if s.slstm.backend not in ("vanilla", "cuda"):
            raise ValueError(f"xLSTM config: sLSTM backend '{s.slstm.backend}' unknown (expected 'vanilla' or 'cuda')")
        if s.slstm.function != "slstm":
            raise ValueError(f"xLSTM config: sLSTM function '{s.slstm.function}' is not supported (only 'slstm')")
        if s.slstm.num_heads < 1 or self.embedding_dim % s.slstm.num_heads:
            raise ValueError(
                f"xLSTM config: slstm num_heads {s.slstm.num_heads} does not divide embedding_dim {self.embedding_dim}"
            )
        ff = s.feedforward
        if ff is not None and (ff.ff_type != "ffn_gated" or ff.act_fn not in _ACTIVATIONS):
            raise ValueError(
                f"xLSTM config: feedforward {ff.ff_type}/{ff.act_fn} unsupported "
                f"(ffn_gated with one of {sorted(_ACTIVATIONS)})"
            )

    @property
    def block_map(self) -> List[int]:
        """0 = mLSTM block, 1 = sLSTM block, per position."""
        return [int(i in self.slstm_at) for i in range(self.num_blocks)]

    @property
    def mlstm_inner_dim(self) -> int:
        m = self.mlstm_block.mlstm
        return proj_up_dim(m.proj_factor, self.embedding_dim, m.round_proj_up_to_multiple_of, m.round_proj_up_dim_up)

    @property
    def ffn_dim(self) -> int:
        f = self.slstm_block.feedforward
        return proj_up_dim(f.proj_factor, self.embedding_dim, f.round_proj_up_to_multiple_of, f.round_proj_up_dim_up)


class xLSTMBlock(nn.Module):
    """x += layer(LN(x)); sLSTM blocks also x += FFN(LN(x))."""

    def __init__(self, args: ModelArgs, block_idx: int, is_slstm: bool):
        super().__init__()
        D = args.embedding_dim
        self.xlstm_norm = LayerNorm(D)
        self.xlstm = sLSTMLayer(args, block_idx) if is_slstm else mLSTMLayer(args)
        ff = args.slstm_block.feedforward if is_slstm else None
        if ff is not None:
            self.ffn_norm = LayerNorm(D)
            self.ffn = GatedFeedForward(D, args.ffn_dim, ff.act_fn, ff.bias, ff.dropout, args.num_blocks)

    def __call__(self, x, mask=None, cache=None):
        x = x + self.xlstm(self.xlstm_norm(x), mask, cache)
        if "ffn" in self:
            x = x + self.ffn(self.ffn_norm(x))
        return x


class xLSTMBlockStack(BlockPipeline, nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.layers = [xLSTMBlock(args, i, kind == 1) for i, kind in enumerate(args.block_map)]
        if args.add_post_blocks_norm:
            self.post_blocks_norm = LayerNorm(args.embedding_dim)

    def __call__(self, x, mask=None, cache=None):
        x = self.run_blocks(x, mask, cache)
        return self.post_blocks_norm(x) if "post_blocks_norm" in self else x


class Model(RecurrentModel):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        D, V = args.embedding_dim, args.vocab_size
        self.xlstm_block_stack = xLSTMBlockStack(args)
        self.token_embedding = nn.Embedding(V, D)
        self.token_embedding.weight = small_init((V, D), D)
        self.emb_dropout = nn.Dropout(args.dropout if args.add_embedding_dropout else 0.0)
        if not args.tie_weights:
            self.lm_head = nn.Linear(D, V, bias=False)
            self.lm_head.weight = small_init((V, D), D)

    def forward(self, inputs, mask, cache, fresh: bool):
        return self.in_pieces(self._logits, inputs, mask, cache)

    def _logits(self, inputs, mask, cache):
        x = self.emb_dropout(self.token_embedding(inputs))
        x = self.xlstm_block_stack(x, mask, cache)
        if self.args.tie_weights:
            return self.token_embedding.as_linear(x)
        return self.lm_head(x)

    @property
    def layers(self):
        return self.xlstm_block_stack.pipeline_layers

    @property
    def model(self):
        # Where mlx-lm's sharded_load looks for the pipeline layout.
        return self.xlstm_block_stack

    def shard(self, group: Optional[mx.distributed.Group] = None):
        """Tensor parallel over heads: mLSTM and sLSTM layers with their states, and the
        FFN; every split is checked before anything changes."""
        group = group or mx.distributed.init()
        self._check_tensor_parallel(group.size())
        for block in self.layers:
            block.xlstm.shard(group)
            if "ffn" in block:
                block.ffn.shard(group)
        self.distributed = group.size() > 1

    def _check_tensor_parallel(self, N: int):
        args = self.args

        def refuse(what):
            raise ValueError(
                f"xLSTM tensor parallel: {what} does not split over {N} ranks "
                "(use a group size that divides it, or pipeline parallel)"
            )

        kinds = set(args.block_map)
        if 0 in kinds:
            m, inner = args.mlstm_block.mlstm, args.mlstm_inner_dim
            if m.num_heads % N:
                refuse(f"mLSTM num_heads {m.num_heads} (inner width and conv channels {inner})")
            # A block of the headwise q/k/v projections must not straddle two ranks.
            if (inner // m.qkv_proj_blocksize) % N:
                refuse(f"mLSTM qkv_proj_blocksize {m.qkv_proj_blocksize} ({inner // m.qkv_proj_blocksize} blocks)")
        if 1 in kinds:
            NH = args.slstm_block.slstm.num_heads
            if NH % N:
                refuse(f"sLSTM num_heads {NH} (conv channels {args.embedding_dim})")
            if args.slstm_block.feedforward is not None and args.ffn_dim % N:
                refuse(f"FFN width {args.ffn_dim}")
        for j, block in enumerate(self.layers):
            inputs_split = {name: m for name, m in block.named_modules() if name in ("xlstm.proj_down", "ffn.proj_down")}
            check_split_inputs({f"xlstm_block_stack.layers.{j}.{name}": m for name, m in inputs_split.items()}, N)

    @property
    def recurrent_layers(self):
        return [block.xlstm for block in self.layers]

    def sanitize(self, weights: dict) -> dict:
        """The reference's state_dict -> ours: sLSTM kernel/bias to our layout (per the
        backend that wrote them), conv weights to MLX's layout, the tied head dropped."""
        out = {}
        for key, value in weights.items():
            # `layers.N.` as in mlx-lm's models, which its pipeline loading looks for.
            key = key.replace("xlstm_block_stack.blocks.", "xlstm_block_stack.layers.")
            if self.args.tie_weights and key == "lm_head.weight":
                continue
            if key.endswith("slstm_cell._recurrent_kernel_"):
                key, value = key[: -len("_recurrent_kernel_")] + "recurrent_kernel", self._recurrent_kernel(key, value)
            elif key.endswith("slstm_cell._bias_"):
                key, value = key[: -len("_bias_")] + "bias", self._slstm_bias(key, value)
            elif key.endswith("conv1d.conv.weight") and value.ndim == 3 and value.shape[1] == 1 and value.shape[2] != 1:
                value = value.swapaxes(1, 2)  # torch (D, 1, K) -> MLX (D, K, 1)
            out[key] = value
        check_weights(self, out)
        return out

    def _slstm_dims(self):
        NH = self.args.slstm_block.slstm.num_heads
        return NH, self.args.embedding_dim // NH, self.args.slstm_block.slstm.backend

    def _recurrent_kernel(self, key, R):
        NH, DH, backend = self._slstm_dims()
        # vanilla stores (NH, 4 * DH_out, DH_in); cuda (NH, DH_in, 4 * DH_out), which is ours.
        expected = (NH, NUM_GATES * DH, DH) if backend == "vanilla" else (NH, DH, NUM_GATES * DH)
        if tuple(R.shape) != expected:
            raise ValueError(
                f"xLSTM checkpoint: '{key}' has shape {tuple(R.shape)}; the config (backend "
                f"'{backend}', {NH} heads of {DH}) implies {expected}"
            )
        if backend == "vanilla":
            R = R.reshape(NH, NUM_GATES, DH, DH).transpose(0, 3, 1, 2).reshape(NH, DH, NUM_GATES * DH)
        return R

    def _slstm_bias(self, key, b):
        NH, DH, backend = self._slstm_dims()
        if tuple(b.shape) != (NUM_GATES * NH * DH,):
            raise ValueError(
                f"xLSTM checkpoint: '{key}' has shape {tuple(b.shape)}; the config implies {(NUM_GATES * NH * DH,)}"
            )
        # vanilla stores (gate, head, DH) flattened; cuda (head, gate, DH), which is ours.
        if backend == "vanilla":
            return b.reshape(NUM_GATES, NH, DH).transpose(1, 0, 2)
        return b.reshape(NH, NUM_GATES, DH)

    @property
    def cast_predicate(self):
        return lambda path: not ("mlstm_cell.igate" in path or "mlstm_cell.fgate" in path or "slstm_cell" in path)
