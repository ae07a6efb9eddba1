"""What both architectures share as mlx-lm models: the call protocol and the compiled decode step.

`RecurrentModel.__call__` is mlx-lm's `model(inputs, cache)`: it makes the mask of a
right-padded batch, checks a cache it did not make, runs a decode step compiled or the
whole forward, and advances every cache once. A model defines `forward(inputs, mask,
cache, fresh)` (which runs its layers through `in_pieces`), `layers`, `model` (its pipeline
holder) and `recurrent_layers` (the layer of each block that keeps a state, with its
`cache_slots`).
"""

import copy
import dataclasses
import functools
from typing import Any, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_ssm_mask
from mlx_lm.models.cache import ArraysCache

from . import kernels, warm_up
from .cache import MAX_UNDO_CALL, StepInputs, keep_inputs, speculative_call
from .mlstm import fast_path_enabled, pieces

# A prompt call runs in pieces of whole multiples of PROMPT_UNIT tokens (at most
# PROMPT_PIECE) and a rest padded to a power of two of at least PROMPT_SHORTEST tokens
# (`mlstm.pieces`): below ~256 tokens a 7B forward costs about one read of the weights
# whatever its length, so a short rest pays little for its padding, and a piece longer than
# mlstm.SHORT_CALL runs the cell as one pass of the prompt does (bf16 matmuls; H200: a
# 32-token piece's fp32 cell first compiled its own kernels, 19 s). mlx-lm's prefill steps
# are 2048 tokens.
PROMPT_UNIT = 256
PROMPT_PIECE = 2048
PROMPT_SHORTEST = 128


def prompt_pieces_pay() -> bool:
    """Where prompt pieces pay: on CUDA, whose graphs MLX builds anew for a new length. On Metal
    and the CPU a new length costs no more than a repeated one (a trace at most, which the
    cell's own pieces bound), and a short forward there is bound by compute, not by reading
    the weights: the padding would cost its tokens."""
    return mx.default_device().type == mx.DeviceType.gpu and mx.cuda.is_available()


class CompiledDecode:
    """A model's decode step as one compiled function of (tokens, states[, mask]).

    mlx-lm's generation loop calls the model once per token; tracing the step once per
    batch size, instead of rebuilding its graph every token, is worth ~35% of decode speed.
    Speculative decoding's short calls (a verify call of k+1 tokens) are traced per length.
    The weights are inputs of the compiled function (model.state), so quantizing or adapting
    the model later retraces it. A copy of the model starts without one."""

    def __init__(self):
        self.fn = None

    def __deepcopy__(self, memo):
        return CompiledDecode()

    def __call__(self, model, inputs: mx.array, mask: Optional[mx.array], cache: list) -> mx.array:
        if self.fn is None:
            self.fn = mx.compile(functools.partial(forward_states, model), inputs=model.state)
        # Token ids as mlx-lm's samplers give them: a prompt's last token comes as int32, and
        # a new dtype is a new trace (two traces before a first token, two a batch size).
        inputs = inputs.astype(mx.uint32)
        states = [c.cache for c in cache]
        with kernels.without_vjp():  # traced for generation, never differentiated
            logits, states, kept = self.fn(inputs, states) if mask is None else self.fn(inputs, states, mask)
        for c, state, inputs in zip(cache, states, kept):
            c.cache = state
            keep_inputs(c, inputs)
        return logits


class CompiledReplays:
    """Each layer's recurrence on a trim's kept inputs (`UndoableCache.trim`) as one compiled
    function, traced per kept length, the layer's weights as inputs: eager, a replay is some
    twenty small ops a layer, each a launch. Off where the decode step is not compiled. A
    copy of the model starts without them."""

    def __init__(self, model):
        self.model, self.fns = model, {}

    def __deepcopy__(self, memo):
        return CompiledReplays(copy.deepcopy(self.model, memo))

    def of(self, layer):
        """`replay(cache, **inputs)` for the layer's UndoableCache."""

        def replay(cache, **inputs):
            if not self.model.compiled_decode or any(x is None for x in cache.cache):
                return layer.replay(cache, **inputs)
            if id(layer) not in self.fns:
                self.fns[id(layer)] = mx.compile(functools.partial(replay_states, layer), inputs=layer.state)
            with kernels.without_vjp():
                cache.cache = self.fns[id(layer)](cache.cache, inputs)

        return replay


def replay_states(layer, states: list, inputs: dict) -> list:
    cache = ArraysCache(size=len(states))
    cache.cache = list(states)
    layer.replay(cache, **inputs)
    return cache.cache


def forward_states(model, inputs: mx.array, states: list, mask: Optional[mx.array] = None):
    """One forward on a non-empty state as a pure function: (logits, new states, each
    layer's recurrence inputs, which a cache that can be trimmed keeps)."""
    cache = [StepInputs(size=len(state)) for state in states]
    for c, state in zip(cache, states):
        c.cache = list(state)
    logits = model.forward(inputs, mask, cache, fresh=False)
    return logits, [c.cache for c in cache], [c.kept for c in cache]


class RecurrentModel(nn.Module):
    # Set by `shard` when the model is split over ranks.
    distributed = False

    def __init__(self):
        super().__init__()
        self.decode_step = CompiledDecode()
        self.trim_replays = CompiledReplays(self)
        self.warm_up_started = False

    def __call__(self, inputs: mx.array, cache: Optional[List[Any]] = None) -> mx.array:
        T = inputs.shape[1]
        if T == 0:
            raise ValueError("xLSTM: the prompt is empty (0 tokens); give the model at least one token")
        if not self.warm_up_started:
            self.warm_up_started = True
            warm_up.start(self)
        mask = create_ssm_mask(inputs, cache[0] if cache else None)
        fresh = not cache or cache[0].empty()
        if not fresh:
            self.check_cache(cache)
        if not fresh and (T == 1 or speculative_call(cache, T)) and self.compiled_decode:
            logits = self.decode_step(self, inputs, mask, cache)
        else:
            logits = self.forward(inputs, mask, cache, fresh=fresh)
        for c in cache or []:
            c.advance(T)
        return logits

    def in_pieces(self, logits_of, inputs: mx.array, mask: Optional[mx.array], cache: Optional[list]) -> mx.array:
        """`logits_of(inputs, mask, cache)`, a prompt call longer than MAX_UNDO_CALL tokens
        run in pieces of a few fixed lengths (`pieces`), each evaluated while the next is
        built, where they pay (`prompt_pieces_pay`).

        Every prompt length, chat turn and server request has a length of its own; on CUDA
        a forward of a new length builds new CUDA graphs (cuBLAS picks other kernels for
        another row count), 1.3-2.5x the time of a length run before (H200, 7B; in pieces
        1.03-1.11x). MLX's graph cache keys the graph of a run of ops, so the pieces are
        evaluated apart, every one with a mask and states in the cache: a piece of a length met
        before is then the same graph, first or not (zeros made inside the first piece,
        or a mask left out, would be nodes of its own). A layer's `zero_state(B)`, where it
        has one, gives those states. Short calls keep one pass: a trim (speculative
        decoding) replays their kept inputs. Training and evaluation (no cache) keep one
        pass too."""
        B, T = inputs.shape[:2]
        if cache is None or T <= MAX_UNDO_CALL or not self.compiled_decode or not prompt_pieces_pay():
            return logits_of(inputs, mask, cache)
        layers = self.recurrent_layers
        if cache[0].empty() and all(hasattr(layer, "zero_state") for layer in layers):
            for layer, c in zip(layers, cache):
                layer.cache_slots.write(c, **layer.zero_state(B))
        mask = mx.ones((B, T), dtype=mx.bool_) if mask is None else mask
        outputs, start = [], 0
        for n, padded in pieces(T, PROMPT_UNIT, PROMPT_PIECE, PROMPT_SHORTEST):
            mx.async_eval([c.cache for c in cache if not c.empty()])
            x, m = inputs[:, start : start + n], mask[:, start : start + n]
            if padded > n:  # masked steps leave every state as it is
                x, m = (mx.pad(y, [(0, 0), (0, padded - n)]) for y in (x, m))
            outputs.append(logits_of(x, m, cache)[:, :n])
            start += n
        return mx.concatenate(outputs, axis=1) if len(outputs) > 1 else outputs[0]

    @property
    def compiled_decode(self) -> bool:
        """Decode steps run as one compiled function, unless split over ranks or the user
        asked for the plain ops path (MLX_XLSTM_KERNELS=0)."""
        return fast_path_enabled() and not self.distributed and self.model.pipeline_size == 1

    def warm_up_config(self) -> dict:
        """The config of the copy `warm_up` builds this model's kernels with: the same
        constants and head shapes, a vocabulary of 64 (a model may cut its depth too)."""
        return {**dataclasses.asdict(self.args), "vocab_size": 64}

    def make_cache(self):
        return [layer.cache_slots.make_cache(self.trim_replays.of(layer)) for layer in self.recurrent_layers]

    def check_cache(self, cache: list):
        """A prompt cache saved with another model fails here, naming what differs, not deep in a layer."""
        found = [len(c.cache) if isinstance(c, ArraysCache) else type(c).__name__ for c in cache]
        expected = [len(layer.cache_slots.names) for layer in self.recurrent_layers]
        if found != expected:
            self.refuse_cache(f"{len(found)} layers with state slots {found[:4]}", f"{len(expected)} layers with {expected[:4]}")

    @staticmethod
    def refuse_cache(found: str, expected: str):
        raise ValueError(
            f"xLSTM: the prompt cache does not fit this model (saved with another one?): it holds {found}; "
            f"the model needs {expected}"
        )
