"""xLSTM-7b ("xLSTM large"): mLSTM blocks with a SwiGLU FFN. `sanitize` takes transformers' weights."""

from dataclasses import dataclass
from typing import Any, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import BaseModelArgs, create_ssm_mask
from mlx_lm.models.cache import ArraysCache

from .kernels import kernels_enabled, mlstm_chunkwise, mlstm_step
from .distributed import BlockPipeline, shard_heads
from .mlstm import MASKED_I


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


def soft_cap(x: mx.array, cap: float) -> mx.array:
    return cap * mx.tanh(x / cap)


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


class MultiHeadLayerNorm(nn.Module):
    """LayerNorm over each head's values (mean-centred, biased variance, fp32), weight per channel."""

    def __init__(self, num_heads: int, head_dim: int, eps: float, bias: bool):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((num_heads * head_dim,))
        if bias:
            self.bias = mx.zeros((num_heads * head_dim,))

    def __call__(self, h):
        B, T, _, _ = h.shape
        y = mx.fast.layer_norm(h.astype(mx.float32), None, None, self.eps)
        y = y.reshape(B, T, -1) * self.weight
        return y + self.bias if "bias" in self else y


class GateProjection(nn.Module):
    """The input/forget gate pre-activation, one per head, in fp32.

    Not an nn.Linear on purpose: without `to_quantized`, no quantization recipe of
    mlx-lm touches it, and the exponential gates stay exact.
    """

    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        scale = dims**-0.5  # nn.Linear's init
        self.weight = mx.random.uniform(-scale, scale, (num_heads, dims))
        self.bias = mx.random.uniform(-scale, scale, (num_heads,))

    def __call__(self, x):
        return mx.addmm(self.bias, x.astype(mx.float32), self.weight.astype(mx.float32).T)


class mLSTMLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, H, bias = args.hidden_size, args.num_heads, args.use_bias
        self.num_heads = H
        self.chunk_size = args.chunk_size
        self.max_piece = args.max_inference_chunksize
        self.gate_soft_cap = args.gate_soft_cap
        self.eps = args.eps
        self.q_proj = nn.Linear(D, args.qk_dim, bias=bias)
        self.k_proj = nn.Linear(D, args.qk_dim, bias=bias)
        self.v_proj = nn.Linear(D, args.v_dim, bias=bias)
        self.ogate_preact = nn.Linear(D, args.v_dim, bias=bias)
        self.igate_preact = GateProjection(D, H)
        self.fgate_preact = GateProjection(D, H)
        self.multihead_norm = MultiHeadLayerNorm(H, args.v_dim // H, args.norm_eps, bias)
        self.out_proj = nn.Linear(args.v_dim, D, bias=bias)

    def _gates(self, x, mask):
        i = soft_cap(self.igate_preact(x), self.gate_soft_cap)
        f = soft_cap(self.fgate_preact(x), self.gate_soft_cap)
        log_f = nn.log_sigmoid(f)
        if mask is not None:
            i = mx.where(mask[..., None], i, MASKED_I)
            log_f = mx.where(mask[..., None], log_f, 0.0)
        return i.swapaxes(1, 2), log_f.swapaxes(1, 2)

    def _chunkwise(self, q, k, v, i, log_f, state):
        """Pieces of at most max_inference_chunksize tokens, the state carried between them:
        the same result as one pass, in a working set bounded whatever the length."""
        hs = []
        for s in range(0, q.shape[2], self.max_piece):
            piece = slice(s, s + self.max_piece)
            h, state = mlstm_chunkwise(
                q[:, :, piece], k[:, :, piece], v[:, :, piece], i[..., piece], log_f[..., piece],
                *state, chunk_size=self.chunk_size, eps=self.eps,
            )
            hs.append(h)
        return mx.concatenate(hs, axis=2) if len(hs) > 1 else hs[0], state

    def __call__(self, x, mask=None, cache=None):
        B, T, _ = x.shape
        H = self.num_heads
        heads = lambda y: y.reshape(B, T, H, -1).swapaxes(1, 2)
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        i, log_f = self._gates(x, mask)

        if cache is not None and cache[0] is not None:
            state = (cache[0], cache[1], cache[2])
        else:
            Dqk, Dv = q.shape[-1], v.shape[-1]
            state = (
                mx.zeros((B, H, Dqk, Dv), mx.float32),
                mx.zeros((B, H, Dqk), mx.float32),
                mx.zeros((B, H), mx.float32),
            )
        if T == 1:
            h, state = mlstm_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[..., 0], log_f[..., 0], *state, eps=self.eps)
            h = h[:, :, None]
        else:
            h, state = self._chunkwise(q, k, v, i, log_f, state)
        if cache is not None:
            cache[0], cache[1], cache[2] = state

        h = self.multihead_norm(h.swapaxes(1, 2)).astype(x.dtype)
        return self.out_proj(mx.sigmoid(self.ogate_preact(x)) * h)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, F, bias = args.hidden_size, args.ffn_dim, args.use_bias
        self.gate_proj = nn.Linear(D, F, bias=bias)
        self.up_proj = nn.Linear(D, F, bias=bias)
        self.down_proj = nn.Linear(F, D, bias=bias)

    def __call__(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class mLSTMBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm_mlstm = RMSNorm(args.hidden_size, args.norm_eps, args.use_bias)
        self.mlstm_layer = mLSTMLayer(args)
        self.norm_ffn = RMSNorm(args.hidden_size, args.norm_eps, args.use_bias)
        self.ffn = FeedForward(args)

    def __call__(self, x, mask=None, cache=None):
        x = x + self.mlstm_layer(self.norm_mlstm(x), mask, cache)
        return x + self.ffn(self.norm_ffn(x))


class xLSTMBackbone(BlockPipeline, nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [mLSTMBlock(args) for _ in range(args.num_hidden_layers)]
        if args.add_out_norm:
            self.out_norm = RMSNorm(args.hidden_size, args.norm_eps, False)

    def __call__(self, x, mask=None, cache=None):
        x = self.run_blocks(x, mask, cache)
        return self.out_norm(x) if "out_norm" in self else x


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.backbone = xLSTMBackbone(args)
        # transformers keeps a separate lm_head even when the config says tied.
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.decode_step = CompiledStep()

    def __call__(self, inputs: mx.array, cache: Optional[List[Any]] = None) -> mx.array:
        T = inputs.shape[1]
        first = cache[0] if cache else None
        mask = create_ssm_mask(inputs, first)
        fresh = first is None or first.empty()
        if not fresh:
            _check_cache(self, cache)
        if not fresh and T == 1 and mask is None and self.compiled_decode:
            logits = _compiled_decode(self, inputs, cache)
        elif fresh and self.args.force_bos_token_insert:
            logits = self._logits(*self._insert_bos(inputs, mask), cache)[:, 1:]
        else:
            logits = self._logits(inputs, mask, cache)
        for c in cache or []:
            c.advance(T)
        return logits

    def _decode_states(self, inputs, states):
        cache = [ArraysCache(size=3) for _ in states]
        for c, state in zip(cache, states):
            c.cache = list(state)
        return self._logits(inputs, None, cache), [c.cache for c in cache]

    def _logits(self, inputs, mask, cache):
        h = self.backbone(self.backbone.embeddings(inputs), mask, cache)
        logits = self.lm_head(h)
        cap = self.args.output_logit_soft_cap
        return soft_cap(logits.astype(mx.float32), cap).astype(logits.dtype)

    @property
    def compiled_decode(self) -> bool:
        """Decode steps run as one compiled function, unless split over ranks or the user
        asked for the plain ops path (MLX_XLSTM_KERNELS=0)."""
        return kernels_enabled() and not self.distributed and self.backbone.pipeline_size == 1

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

    distributed = False

    def shard(self, group: Optional[mx.distributed.Group] = None):
        group = group or mx.distributed.init()
        shard_heads(self, group)
        self.distributed = group.size() > 1

    def make_cache(self):
        return [ArraysCache(size=3) for _ in self.layers]

    def sanitize(self, weights: dict) -> dict:
        weights = self._split_fused(weights)
        # Errors name tensors as the checkpoint does.
        as_in_checkpoint = hf_name if any(mlx_name(k) != k for k in weights) else str
        weights = {mlx_name(k): v for k, v in weights.items()}
        if self.args.tie_word_embeddings and "lm_head.weight" not in weights:
            weights["lm_head.weight"] = weights["backbone.embeddings.weight"]
        _check_weights(self, weights, as_in_checkpoint)
        _report_unquantized(self, weights)
        return weights

    def _split_fused(self, weights: dict) -> dict:
        """weight_mode 'fused' -> the single layout (one way to hold the weights)."""
        a = self.args
        splits = {
            "mlstm_layer.qkv_opreact": (
                ["q", "k", "v", "ogate_preact"],
                [a.qk_dim, 2 * a.qk_dim, 2 * a.qk_dim + a.v_dim],
            ),
            "mlstm_layer.ifgate_preact": (["igate_preact", "fgate_preact"], [a.num_heads]),
            "ffn.proj_up_gate_z": (["proj_up_gate", "proj_up"], [a.ffn_dim]),
        }
        out = {}
        for key, value in weights.items():
            for fused, (names, cuts) in splits.items():
                if f".{fused}." in key:
                    prefix, param = key.split(f".{fused}.")
                    parent = fused.rsplit(".", 1)[0]
                    for name, part in zip(names, mx.split(value, cuts, axis=0)):
                        out[f"{prefix}.{parent}.{name}.{param}"] = part
                    break
            else:
                out[key] = value
        return out

    @property
    def cast_predicate(self):
        return lambda path: not ("igate_preact" in path or "fgate_preact" in path)


class CompiledStep:
    """Holds a model's compiled decode step; a copy of the model starts without one."""

    fn = None

    def __deepcopy__(self, memo):
        return CompiledStep()


def _compiled_decode(model: "Model", inputs: mx.array, cache: list) -> mx.array:
    """mlx-lm's generation loop calls the model once per token; tracing the step once per
    batch size, instead of rebuilding its graph every token, is worth ~35% of decode speed.
    The weights are inputs of the compiled function (model.state), so quantizing or adapting
    the model later retraces it."""
    if model.decode_step.fn is None:
        model.decode_step.fn = mx.compile(model._decode_states, inputs=model.state)
    logits, states = model.decode_step.fn(inputs, [c.cache for c in cache])
    for c, state in zip(cache, states):
        c.cache = state
    return logits


# transformers' names -> ours, which follow mlx-lm's (`layers.N.` for pipeline loading,
# `down_proj`/`v_proj` for the mixed quantization recipes).
HF_TO_MLX = {
    "backbone.blocks.": "backbone.layers.",
    ".mlstm_layer.q.": ".mlstm_layer.q_proj.",
    ".mlstm_layer.k.": ".mlstm_layer.k_proj.",
    ".mlstm_layer.v.": ".mlstm_layer.v_proj.",
    ".ffn.proj_up_gate.": ".ffn.gate_proj.",
    ".ffn.proj_up.": ".ffn.up_proj.",
    ".ffn.proj_down.": ".ffn.down_proj.",
}


def mlx_name(key: str) -> str:
    for hf, ours in HF_TO_MLX.items():
        key = key.replace(hf, ours)
    return key


def hf_name(key: str) -> str:
    for hf, ours in HF_TO_MLX.items():
        key = key.replace(ours, hf)
    return key


def _check_cache(model: "Model", cache: list):
    """A prompt cache saved with another model fails here, naming the shapes, not deep in the cell."""
    args = model.args
    expected = (model.layers[0].mlstm_layer.num_heads, args.qk_dim // args.num_heads, args.v_dim // args.num_heads)
    first = cache[0]
    found = tuple(first[0].shape[1:]) if isinstance(first, ArraysCache) else type(first).__name__
    if len(cache) != len(model.layers) or found != expected:
        raise ValueError(
            f"xLSTM: the prompt cache does not fit this model (saved with another one?): it holds "
            f"{len(cache)} layers with state C {found} per sequence; the model needs "
            f"{len(model.layers)} layers with C (heads, Dqk, Dv) = {expected}"
        )


def _check_weights(model: nn.Module, weights: dict, as_in_checkpoint=str):
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


def _report_unquantized(model: nn.Module, weights: dict):
    """mlx-lm's quantize leaves a layer in float, without a word, when the group size does
    not divide its input width (the FFN down projection of xLSTM-7b: 10944 = 171 x 64, so
    at group 128). Say so on load, with the group sizes that would fit."""
    import warnings

    scales = {k[: -len(".scales")]: v for k, v in weights.items() if k.endswith(".scales")}
    if not scales:
        return
    linears = {p: m for p, m in model.named_modules() if hasattr(m, "to_quantized")}
    path, s = next(iter(scales.items()))
    group_size = linears[path].weight.shape[-1] // s.shape[-1]
    skipped = {
        p: m.weight.shape[-1] for p, m in linears.items()
        if p not in scales and m.weight.shape[-1] % group_size
    }
    if skipped:
        widths = sorted(set(skipped.values()))
        fits = [g for g in (128, 64, 32) if all(w % g == 0 for w in widths)]
        warnings.warn(
            f"xLSTM: {len(skipped)} layers stay unquantized (e.g. {next(iter(skipped))}): their input "
            f"width {widths} is not a multiple of the group size {group_size}"
            + (f"; --q-group-size {fits[0]} quantizes them too" if fits else ""),
            stacklevel=2,
        )
