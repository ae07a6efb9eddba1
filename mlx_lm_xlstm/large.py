"""xLSTM-7b ("xLSTM large"): mLSTM blocks with a SwiGLU FFN. `sanitize` takes transformers' weights."""

from dataclasses import dataclass
from itertools import accumulate
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import BaseModelArgs

from . import kernels
from .cache import StateSlots
from .checkpoint import check_weights, fuse_projections, hf_name, mlx_name, report_unquantized
from .distributed import BlockPipeline, check_split_inputs
from .mlstm import GateProjection, fast_path_enabled, log_sigmoid, mlstm_update, zero_state
from .recurrent import RecurrentModel


def round_up(x: float, multiple: int) -> int:
    return int(((x + multiple - 1) // multiple) * multiple)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "xlstm"
    vocab_size: int = 50304
    # NX-AI writes embedding_dim/num_blocks, transformers hidden_size/num_hidden_layers.
    hidden_size: Optional[int] = None
    embedding_dim: Optional[int] = None
    num_hidden_layers: Optional[int] = None
    num_blocks: Optional[int] = None
    num_heads: int = 8
    qk_dim_factor: float = 0.5
    v_dim_factor: float = 1.0
    chunk_size: int = 64
    # Longest piece the chunkwise form takes at once: its working set grows with the piece.
    max_inference_chunksize: int = 16384
    gate_soft_cap: float = 15.0
    output_logit_soft_cap: float = 30.0
    ffn_proj_factor: float = 2.667
    ffn_round_up_to_multiple_of: int = 64
    norm_eps: float = 1e-6
    eps: float = 1e-6
    use_bias: bool = False
    add_out_norm: bool = True
    weight_mode: str = "single"
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    force_bos_token_insert: bool = False

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        # xLSTM-7b's config says eos_token_id 2, which is "!"; its text ends with
        # <|endoftext|>, the BOS token. mlx-lm hands this same dict to the
        # tokenizer loader afterwards, so correcting it here fixes generation too.
        params["eos_token_id"] = params.get("bos_token_id", 0)
        return super().from_dict(params)

    def __post_init__(self):
        self.hidden_size = _one_of(self, "hidden_size", "embedding_dim")
        self.num_hidden_layers = _one_of(self, "num_hidden_layers", "num_blocks")
        if self.weight_mode not in ("single", "fused"):
            raise ValueError(
                f"xLSTM config: weight_mode '{self.weight_mode}' is not supported "
                "(expected 'single' or 'fused')"
            )
        for name in ("vocab_size", "num_heads", "chunk_size", "max_inference_chunksize", "hidden_size", "num_hidden_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"xLSTM config: {name} must be positive, got {getattr(self, name)}")
        for name, dim in (("qk_dim", self.qk_dim), ("v_dim", self.v_dim)):
            if dim == 0 or dim % self.num_heads:
                raise ValueError(
                    f"xLSTM config: {name} = {dim} (hidden_size {self.hidden_size} x "
                    f"{name}_factor) is not divisible by num_heads {self.num_heads}"
                )

    @property
    def qk_dim(self) -> int:
        return int(self.hidden_size * self.qk_dim_factor)

    @property
    def v_dim(self) -> int:
        return int(self.hidden_size * self.v_dim_factor)

    @property
    def ffn_dim(self) -> int:
        return round_up(self.hidden_size * self.ffn_proj_factor, self.ffn_round_up_to_multiple_of)


def _one_of(args, name: str, alias: str) -> int:
    value, other = getattr(args, name), getattr(args, alias)
    if value is None and other is None:
        raise ValueError(f"xLSTM config: needs '{name}' (or '{alias}')")
    if value is not None and other is not None and value != other:
        raise ValueError(f"xLSTM config: '{name}' = {value} contradicts '{alias}' = {other}")
    return value if value is not None else other


def qkvo_rows(args: ModelArgs) -> list:
    """The rows of q, k, v and the output gate in the fused qkvo_proj, in that order."""
    return [args.qk_dim, args.qk_dim, args.v_dim, args.v_dim]


def soft_cap(x: mx.array, cap: float) -> mx.array:
    return cap * mx.tanh(x / cap)


def head_gates_ops(x, weight, bias, cap: float):
    """The input gates' pre-activations and the forget gates' log-sigmoid, fp32, from the
    tokens x (..., D): the fp32 projection (weight (2H, D): input-gate rows, then forget-gate
    rows), its bias, the soft cap. Returns i, log_f (..., H)."""
    gates = soft_cap(x.astype(mx.float32) @ weight.T + bias, cap)
    i, f = mx.split(gates, 2, axis=-1)
    return i, log_sigmoid(f)


def head_gates(x, weight, bias, cap: float, lead=None):
    """`head_gates_ops` by the fused kernel where it applies (one launch for four). lead:
    the results' leading shape, (B, T) for a batch's tokens as rows x (B * T, D): the
    kernel writes them in it, where a reshape would be one more op of every decode step."""
    if fast_path_enabled() and kernels.head_gates_kernel_applies(x, weight, bias):
        i, log_f = kernels.head_gates_kernel(x, weight, bias, cap, lead)
    else:
        i, log_f = head_gates_ops(x, weight, bias, cap)
    if lead is None:
        return i, log_f
    # Sizes spelled out: a reshape to the shape an array has is then no op (the bare kernel's).
    return i.reshape(*lead, i.shape[-1]), log_f.reshape(*lead, log_f.shape[-1])


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float, bias: bool):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dims,))
        if bias:
            self.bias = mx.zeros((dims,))

    def __call__(self, x):
        y = mx.fast.rms_norm(x, self.weight, self.eps)
        return y + self.bias if "bias" in self else y


def gated_head_norm_ops(h, qkvo, weight, bias, o_start: int, eps: float):
    """sigmoid(o) * LayerNorm(h), o = qkvo[..., o_start:] (the output gate's columns of the
    fused projection): LayerNorm over each head's values (mean-centred, biased variance,
    fp32), weight (and bias) per channel, then in qkvo's dtype.
    h: (..., H, Dv) fp32, as many tokens as qkvo (..., E); returns (*qkvo.shape[:-1], H * Dv)."""
    y = mx.fast.layer_norm(h.astype(mx.float32), None, None, eps).reshape(*qkvo.shape[:-1], -1) * weight
    if bias is not None:
        y = y + bias
    return mx.sigmoid(qkvo[..., o_start:]) * y.astype(qkvo.dtype)


def gated_head_norm(h, qkvo, weight, bias, o_start: int, eps: float):
    """`gated_head_norm_ops` by the fused kernel where it applies (one launch, h read once;
    rounded once to qkvo's dtype where the ops round three times)."""
    if fast_path_enabled() and kernels.gated_head_norm_kernel_applies(h, qkvo, weight, bias, o_start):
        return kernels.gated_head_norm_kernel(h, qkvo, weight, bias, o_start, eps)
    return gated_head_norm_ops(h, qkvo, weight, bias, o_start, eps)


class MultiHeadLayerNorm(nn.Module):
    """The per-head LayerNorm of the cell's output, with the output gate (`gated_head_norm`)."""

    def __init__(self, num_heads: int, head_dim: int, eps: float, bias: bool):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((num_heads * head_dim,))
        if bias:
            self.bias = mx.zeros((num_heads * head_dim,))

    def __call__(self, h, qkvo, o_start: int):
        return gated_head_norm(h, qkvo, self.weight, self.get("bias"), o_start, self.eps)


class mLSTMLayer(nn.Module):
    cache_slots = StateSlots("C", "n", "m")

    def __init__(self, args: ModelArgs):
        super().__init__()
        D, H, bias = args.hidden_size, args.num_heads, args.use_bias
        self.num_heads = H
        self.head_dims = (args.qk_dim // H, args.v_dim // H)
        self.chunk_size = args.chunk_size
        self.max_piece = args.max_inference_chunksize
        self.gate_soft_cap = args.gate_soft_cap
        self.eps = args.eps
        # Where q, k and v end in qkvo_proj's rows (the output gate follows).
        self.splits = list(accumulate(qkvo_rows(args)))[:-1]
        # One matmul for q, k, v and the output gate, one for the input and forget gates
        # (fp32): decode reads each weight once either way, but every launch saved is
        # time (issue 14's A/B on the H200: 172 -> 205 tok/s at batch 1, with the FFN's).
        self.qkvo_proj = nn.Linear(D, 2 * args.qk_dim + 2 * args.v_dim, bias=bias)
        self.if_gate_preact = GateProjection(D, 2 * H)
        self.multihead_norm = MultiHeadLayerNorm(H, args.v_dim // H, args.norm_eps, bias)
        self.out_proj = nn.Linear(args.v_dim, D, bias=bias)

    def __call__(self, x, shape, mask=None, cache=None):
        """x: (B * T, D), the tokens of a (B, T) batch as rows (`xLSTMBackbone`); returns the same."""
        B, T = shape
        qkvo = self.qkvo_proj(x)
        gates = self.if_gate_preact
        i, log_f = head_gates(x, gates.weight, gates.bias, self.gate_soft_cap, lead=shape)
        # The undo window keeps qkvo whole: q, k and v apart would be four more ops of
        # every decode step (a split and three reshapes), which the step kernel does not read.
        self.cache_slots.keep(cache, qkvo=qkvo.reshape(B, T, -1), i=i, log_f=log_f, mask=mask)
        h = self.replay(cache, qkvo, i, log_f, mask)
        return self.out_proj(self.multihead_norm(h, qkvo, self.splits[2]))

    def replay(self, cache, qkvo, i, log_f, mask=None):
        """The cell on these inputs from the state in `cache`, which it updates; a trim
        re-runs it on the tokens it keeps. qkvo: the fused projection's output, (B * T, E)
        rows or (B, T, E); i, log_f: (B, T, H). The step kernel reads q, k and v in qkvo."""
        B, T = i.shape[:2]
        qkvo = qkvo.reshape(B * T, -1)
        heads = lambda y: y.reshape(B, T, self.num_heads, -1)
        q, k, v, _ = mx.split(qkvo, self.splits, axis=-1)
        h, (C, n, m) = mlstm_update(
            heads(q), heads(k), heads(v), i, log_f, self.cache_slots.read(cache, "C", "n", "m"), mask,
            chunk_size=self.chunk_size, max_piece=self.max_piece, eps=self.eps, packed=(qkvo, (0, *self.splits[:2])),
        )
        self.cache_slots.write(cache, C=C, n=n, m=m)
        return h

    def zero_state(self, batch_size: int) -> dict:
        """The slots' values before the first token."""
        return dict(zip(("C", "n", "m"), zero_state(batch_size, self.num_heads, *self.head_dims)))

    def shard(self, group: mx.distributed.Group):
        """Tensor parallel: this rank's heads (their q, k, v, output-gate, input- and
        forget-gate rows and norm slice, hence their state); out_proj sums over the group."""
        N = group.size()
        self.qkvo_proj = shard_linear(self.qkvo_proj, "all-to-sharded", segments=self.splits, group=group)
        shard_inplace(self.if_gate_preact, "all-to-sharded", segments=2, group=group)
        shard_inplace(self.multihead_norm, "all-to-sharded", group=group)
        self.out_proj = shard_linear(self.out_proj, "sharded-to-all", group=group)
        self.num_heads //= N
        self.splits = [s // N for s in self.splits]


def swiglu_gate(gate, up):
    """silu(gate) * up: mlx-lm's compiled swiglu (one fused kernel) on the fast path; on the
    plain path the same ops uncompiled, which compile no kernel on a machine's first run
    (`warm_up`; fed by the fused gate|up projection, the compiled one took two CPU variants,
    0.8 s of the demo's first token)."""
    return swiglu(gate, up) if fast_path_enabled() else gate * mx.sigmoid(gate) * up


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, F, bias = args.hidden_size, args.ffn_dim, args.use_bias
        self.gate_up_proj = nn.Linear(D, 2 * F, bias=bias)  # gate rows, then up rows: one matmul
        self.down_proj = nn.Linear(F, D, bias=bias)

    def __call__(self, x):
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(swiglu_gate(gate, up))

    def shard(self, group: mx.distributed.Group):
        self.gate_up_proj = shard_linear(self.gate_up_proj, "all-to-sharded", segments=2, group=group)
        self.down_proj = shard_linear(self.down_proj, "sharded-to-all", group=group)


class mLSTMBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm_mlstm = RMSNorm(args.hidden_size, args.norm_eps, args.use_bias)
        self.mlstm_layer = mLSTMLayer(args)
        self.norm_ffn = RMSNorm(args.hidden_size, args.norm_eps, args.use_bias)
        self.ffn = FeedForward(args)

    def __call__(self, x, mask=None, cache=None, shape=None):
        """x: (B * T, D), the tokens of a (B, T) batch (`shape`) as rows."""
        x = x + self.mlstm_layer(self.norm_mlstm(x), shape, mask, cache)
        return x + self.ffn(self.norm_ffn(x))


class xLSTMBackbone(BlockPipeline, nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [mLSTMBlock(args) for _ in range(args.num_hidden_layers)]
        if args.add_out_norm:
            self.out_norm = RMSNorm(args.hidden_size, args.norm_eps, False)

    def __call__(self, x, mask=None, cache=None):
        # Tokens as rows through every block: a matmul of a 3-D input is a flatten, the
        # matmul and an unflatten, and the host builds and encodes a decode step op by op
        # (H200, 7B shape: ~2.4 us to build and ~4.5 to encode an op; 39 ops a layer, 4.8 ms
        # a step at batch 1 where the GPU took 5, before rows).
        B, T, D = x.shape
        x = self.run_blocks(x.reshape(B * T, D), mask, cache, shape=(B, T))
        x = self.out_norm(x) if "out_norm" in self else x
        return x.reshape(B, T, D)


class Model(RecurrentModel):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.backbone = xLSTMBackbone(args)
        # transformers keeps a separate lm_head even when the config says tied.
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def forward(self, inputs, mask, cache, fresh: bool):
        if fresh and self.args.force_bos_token_insert:
            return self.in_pieces(self._logits, *self._insert_bos(inputs, mask), cache)[:, 1:]
        return self.in_pieces(self._logits, inputs, mask, cache)

    def _logits(self, inputs, mask, cache):
        h = self.backbone(self.backbone.embeddings(inputs), mask, cache)
        logits = self.lm_head(h)
        cap = self.args.output_logit_soft_cap
        return soft_cap(logits.astype(mx.float32), cap).astype(logits.dtype)

    def _insert_bos(self, inputs, mask):
        """Run BOS first, as NX-AI's force_bos_token_insert intends; a sequence that
        already starts with BOS gets the extra step masked, which leaves its state as is."""
        B = inputs.shape[0]
        bos = self.args.bos_token_id
        if mask is None:
            first_token = inputs[:, 0]
            mask = mx.ones(inputs.shape, dtype=mx.bool_)
        else:
            first_valid = mx.argmax(mask, axis=1)
            first_token = mx.take_along_axis(inputs, first_valid[:, None], axis=1)[:, 0]
        needs_bos = first_token != bos
        inputs = mx.concatenate([mx.full((B, 1), bos, dtype=inputs.dtype), inputs], axis=1)
        mask = mx.concatenate([needs_bos[:, None], mask], axis=1)
        return inputs, mask

    @property
    def layers(self):
        return self.backbone.pipeline_layers

    @property
    def model(self):
        # Where mlx-lm's sharded_load looks for the pipeline layout.
        return self.backbone

    @property
    def recurrent_layers(self):
        return [block.mlstm_layer for block in self.layers]

    def check_cache(self, cache: list):
        super().check_cache(cache)
        a = self.args
        expected = (self.layers[0].mlstm_layer.num_heads, a.qk_dim // a.num_heads, a.v_dim // a.num_heads)
        found = tuple(cache[0][0].shape[1:])
        if found != expected:
            self.refuse_cache(
                f"{len(cache)} layers with state C {found} per sequence",
                f"{len(self.layers)} layers with C (heads, Dqk, Dv) = {expected}",
            )

    def shard(self, group: Optional[mx.distributed.Group] = None):
        """Tensor parallel over heads (mLSTM layers) and width (FFN); every split is
        checked before anything changes. Two all-reduces per block."""
        group = group or mx.distributed.init()
        N, a = group.size(), self.args
        if a.num_heads % N:
            raise ValueError(
                f"xLSTM tensor parallel: num_heads {a.num_heads} does not split over {N} ranks "
                "(use a group size that divides it, or pipeline parallel)"
            )
        if a.ffn_dim % N:
            raise ValueError(f"xLSTM tensor parallel: FFN width {a.ffn_dim} does not split over {N} ranks")
        for j, block in enumerate(self.layers):
            inputs_split = {"mlstm_layer.out_proj": block.mlstm_layer.out_proj, "ffn.down_proj": block.ffn.down_proj}
            check_split_inputs({f"backbone.layers.{j}.{name}": m for name, m in inputs_split.items()}, N)
        for block in self.layers:
            block.mlstm_layer.shard(group)
            block.ffn.shard(group)
        self.distributed = N > 1

    def sanitize(self, weights: dict) -> dict:
        # Errors name tensors as the checkpoint does.
        as_in_checkpoint = hf_name if any(mlx_name(k) != k for k in weights) else str
        weights = fuse_projections(self, {mlx_name(k): v for k, v in weights.items()}, as_in_checkpoint)
        if self.args.tie_word_embeddings and "lm_head.weight" not in weights:
            weights["lm_head.weight"] = weights["backbone.embeddings.weight"]
        if "backbone.out_norm.weight" in weights and "out_norm" not in self.backbone:
            # transformers builds and applies out_norm whatever add_out_norm says, and saves it;
            # NX-AI's xLSTMLarge follows the flag and saves none: apply it when it is there.
            self.backbone.out_norm = RMSNorm(self.args.hidden_size, self.args.norm_eps, False)
        check_weights(self, weights, as_in_checkpoint)
        report_unquantized(self, weights)
        return weights

    def warm_up_config(self) -> dict:
        # Two blocks: the first (fed by the embedding) and the others make different kernels.
        config = super().warm_up_config()
        return {**config, **{name: min(config[name], 2) for name in ("num_hidden_layers", "num_blocks") if config[name] is not None}}

    @property
    def part_rows(self) -> dict:
        """The rows of each single projection in its fused one (checkpoint.FUSED)."""
        a = self.args
        return {
            "mlstm_layer.qkvo_proj": qkvo_rows(a),
            "mlstm_layer.if_gate_preact": [a.num_heads, a.num_heads],
            "ffn.gate_up_proj": [a.ffn_dim, a.ffn_dim],
        }

    @property
    def cast_predicate(self):
        return lambda path: "if_gate_preact" not in path
