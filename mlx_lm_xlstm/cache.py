"""Each layer's recurrent state, by slot name, in mlx-lm's own ArraysCache; and the undo
window that lets speculative decoding trim it.

ArraysCache rather than a class of ours: mlx-lm's batching (merge, extend, filter,
extract) and prompt-cache files (which look class names up in mlx_lm.models.cache) take it
as it is. Every slot is written on every call: `extract` and `merge` slice them all.
`UndoableCache` is an ArraysCache to all of these; a batch holds a `BatchCache`, a file the
plain one.
"""

import copy
from typing import Callable, Optional

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache

# A call of at most this many tokens can be undone (a verify call is num_draft_tokens + 1);
# a longer one (a prefill piece) starts the window after it.
MAX_UNDO_CALL = 64
# Single-token calls the window keeps after its first call: a draft makes num_draft_tokens
# of them a round; plain decoding runs past this, and then the cache stops recording.
MAX_UNDO_STEPS = 16


class StateSlots:
    """The names of one layer's state slots, e.g. StateSlots("conv", "C", "n", "m")."""

    def __init__(self, *names: str):
        self.names = names
        self._index = {name: j for j, name in enumerate(names)}

    def make_cache(self, replay: Callable) -> "UndoableCache":
        """The layer's cache; `replay(cache, **kept inputs)` is the layer's recurrence alone,
        which a trim re-runs on the tokens it keeps."""
        return UndoableCache(len(self.names), replay=replay)

    def read(self, cache: Optional[ArraysCache], *names: str):
        """The named slots' values (one value for one name), or None before the first call."""
        if cache is None or cache[self._index[names[0]]] is None:
            return None
        values = tuple(cache[self._index[name]] for name in names)
        return values if len(names) > 1 else values[0]

    def write(self, cache: Optional[ArraysCache], **values):
        if cache is not None:
            for name, value in values.items():
                cache[self._index[name]] = value

    @staticmethod
    def keep(cache: Optional[ArraysCache], **inputs):
        """Hand this call's recurrence inputs (those `replay` takes) to a cache that keeps them."""
        keep_inputs(cache, {name: x for name, x in inputs.items() if x is not None})


def speculative_call(cache: list, T: int) -> bool:
    """A call of a speculative round after the first (every cache has been trimmed): at most
    num_draft_tokens + 1 tokens, of one or two lengths a run, so worth a compiled trace each,
    where prompts of any length are not."""
    return T <= MAX_UNDO_STEPS + 1 and all(getattr(c, "speculating", False) for c in cache)


def keep_inputs(cache, inputs: dict):
    if hasattr(cache, "keep_inputs"):
        cache.keep_inputs(inputs)


class StepInputs(ArraysCache):
    """The stand-in cache of the compiled decode step: it holds the step's kept inputs, which
    leave the compiled function as outputs."""

    kept = {}

    def keep_inputs(self, inputs: dict):
        self.kept = inputs


class UndoableCache(ArraysCache):
    """An ArraysCache that can undo the tokens fed since its last trim, as speculative decoding asks.

    mlx-lm's speculative loop feeds the target one (k+1)-token call and the draft k single
    tokens (or a 2-token call and k-1 single ones), then trims each by what was rejected.
    A recurrent state cannot be cut back, so the cache keeps the state before the window
    (the tokens fed since the last trim) and each call's recurrence inputs (mLSTM: q, k, v
    and gates, xLSTM-7b's q, k, v in its fused projection's output; sLSTM: its gates' input
    part; convolutions: their inputs). `trim(n)` runs the
    layer's recurrence on all but the last n of them from that state (no projections) and
    closes the window. Arrays are immutable: keeping the earlier state costs memory, no copy.

    The window holds the last call of at most MAX_UNDO_CALL tokens and at most
    MAX_UNDO_STEPS single-token calls after it; a longer call starts it after itself, and
    more single tokens without a trim (plain decoding) close it until the next longer call.
    A trim beyond the window raises; none is ever approximated.

    `is_trimmable()`: a new cache, or a copy (the server's fetched prompt cache), says yes;
    a fed one while it holds tokens fed since its last trim. mlx-lm asks right before each
    trim. Its server's prompt-cache store (LRUPromptCache) asks when it stores a cache and
    again before trimming a copy of it by any amount, so a stored cache must say no:
    - after a speculative run (which ends with a trim) it does;
    - after plain generation it does once the window has closed (MAX_UNDO_STEPS tokens);
      before that, single tokens never trimmed look like a draft's first round: such a
      cache says yes once, and no when asked again before it is fed or trimmed. A draft
      trims right after asking; the store asks twice (so ask once, then trim).
    So a stored cache is never trimmed, as an ArraysCache is not (the store may drop its
    shorter prefixes: more recomputation, never a wrong state).
    """

    # from_state (no __init__) makes a cache without a window: an ArraysCache.
    _replay = None
    _fresh = False
    _offer = False
    _trimmed = False
    _start = None
    _calls = ()
    _steps = 0
    _closed = False
    _kept = None
    _before = None

    def __init__(self, size: int, left_padding=None, replay: Optional[Callable] = None):
        super().__init__(size, left_padding)
        self._before = list(self.cache)
        if replay is not None:  # without, an ArraysCache (as `type(cache)(size)` makes)
            self._replay, self._fresh = replay, True

    def keep_inputs(self, inputs: dict):
        if self._replay is not None and inputs:
            self._kept = inputs

    def advance(self, N: int):
        """The end of every call (`RecurrentModel.__call__`): the call's tokens join the window."""
        super().advance(N)
        kept, self._kept = self._kept, None
        before, self._before = self._before, list(self.cache)
        if self._replay is None:
            return
        self._fresh = False
        batch_padded = self.lengths is not None or self.left_padding is not None
        if kept is None or batch_padded:
            self._close()
            self._offer = True  # nothing here to undo: a trim of n > 0 refuses
        elif N > 1:
            self._closed = False
            if N > MAX_UNDO_CALL:
                self._open(list(self.cache), [])
            else:
                self._open(before, [(N, kept)])
        elif self._closed:
            return
        elif self._start is None:
            self._open(before, [(N, kept)])
        elif self._steps < MAX_UNDO_STEPS:
            self._calls.append((N, kept))
            self._steps += 1
        else:
            self._close()
            self._closed = True

    def _open(self, start: list, calls: list):
        self._start, self._calls, self._steps, self._offer = start, calls, 0, True

    def _close(self):
        self._start, self._calls, self._steps, self._offer = None, [], 0, False

    @property
    def speculating(self) -> bool:
        """Trimmed since it was made or copied: in a speculative run."""
        return self._trimmed

    def is_trimmable(self) -> bool:
        if self._fresh:
            return True
        offered = self._offer
        if not self._trimmed and self._calls and self._calls[-1][0] == 1:
            self._offer = False
        return offered

    def trim(self, n: int) -> int:
        window = sum(T for T, _ in self._calls)
        if n > window:
            raise ValueError(
                f"xLSTM: cannot undo {n} tokens: the cache keeps only the last {window} (those fed "
                f"since its last trim, in a call of at most {MAX_UNDO_CALL} tokens and up to "
                f"{MAX_UNDO_STEPS} single tokens after it); use fewer draft tokens"
            )
        if n > 0:
            self.cache = self._replayed(window - n)
            self._before = list(self.cache)
        self._close()
        self._trimmed = True
        return n

    def _replayed(self, tokens: int) -> list:
        """The state after the first `tokens` of the window, from the state before it."""
        if tokens == 0:
            return list(self._start)
        calls, left = [], tokens
        for T, inputs in self._calls:
            take = min(T, left)
            steps = next(iter(inputs.values())).shape[1]  # T, or T + 1 with a BOS step in front
            calls.append({name: x[:, : steps - (T - take)] for name, x in inputs.items()})
            left -= take
            if left == 0:
                break
        if any("mask" in c for c in calls):  # a BOS step's call carries one, later calls none
            for c in calls:
                if "mask" not in c:
                    q = next(iter(c.values()))
                    c["mask"] = mx.ones(q.shape[:2], dtype=mx.bool_)
        inputs = {name: mx.concatenate([c[name] for c in calls], axis=1) for name in calls[0]}
        state = ArraysCache(len(self.cache))
        state.cache = list(self._start)
        self._replay(state, **inputs)
        return state.cache

    def _forget(self):
        """The slots changed outside a call: what the window holds no longer leads to them."""
        self._close()
        self._before = list(self.cache)

    def _set_state(self, v):
        ArraysCache.state.fset(self, v)
        self._forget()

    state = property(ArraysCache.state.fget, _set_state)

    def filter(self, batch_indices):
        super().filter(batch_indices)
        self._forget()

    def extend(self, other):
        super().extend(other)
        self._forget()

    @classmethod
    def merge(cls, caches):
        # A batch is never trimmed.
        return BatchCache.merge(caches)

    def __deepcopy__(self, memo):
        memo[id(self._replay)] = self._replay  # the layer's method: shared, not copied
        twin = self.__class__.__new__(self.__class__)
        memo[id(self)] = twin
        twin.__dict__.update(copy.deepcopy(self.__dict__, memo))
        twin._fresh, twin._trimmed = True, False  # a copy starts afresh: the server's fetched cache
        return twin

    @property
    def nbytes(self):
        current = {id(x) for x in self.cache}
        window = [x for x in self._start or [] if x is not None and id(x) not in current]
        window += [x for _, inputs in self._calls for x in inputs.values()]
        return super().nbytes + sum(x.nbytes for x in window)


class BatchCache(ArraysCache):
    """A batch's states, as mlx-lm's BatchGenerator merges them: an ArraysCache that counts
    its sequences instead of keeping a left padding of zeros to know how many there are.

    ArraysCache.merge gives a batch of new sequences that all-zero padding, and mlx-lm (which
    right-pads batched prompts: `prepare(lengths=...)`) only clears it after a ragged prompt.
    Kept, it made an all-true mask on every call: a batch of equal-length prompts, and every
    mlx_lm.server request, decoded through the masked step, and each token added a
    subtraction per layer (`advance`) to a graph never evaluated until the next prompt.
    """

    def __init__(self, size: int, batch_size: int = 0):
        super().__init__(size)
        self.size = batch_size

    @classmethod
    def merge(cls, caches):
        merged = ArraysCache.merge(caches)
        batch = cls(len(merged.cache), len(caches))
        batch.cache = merged.cache
        return batch

    @property
    def batch_size(self):
        return self.size if self.empty() else super().batch_size

    def filter(self, batch_indices):
        super().filter(batch_indices)
        self.size = len(batch_indices)

    def extend(self, other):
        size = self.batch_size + other.batch_size
        super().extend(other)
        self.size = size


# Prompt-cache files store each layer's class name and look it up in mlx_lm.models.cache:
# under ArraysCache's name these caches load back as what their state is, a plain ArraysCache.
UndoableCache.__name__ = BatchCache.__name__ = "ArraysCache"
