"""Each layer's recurrent state, by slot name, in mlx-lm's own ArraysCache.

ArraysCache rather than a class of ours: mlx-lm's batching (merge, extend, filter,
extract) and prompt-cache files (which look class names up in mlx_lm.models.cache) take it
as it is. Every slot is written on every call: `extract` and `merge` slice them all.
"""

from typing import Optional

from mlx_lm.models.cache import ArraysCache


class StateSlots:
    """The names of one layer's state slots, e.g. StateSlots("conv", "C", "n", "m")."""

    def __init__(self, *names: str):
        self.names = names
        self._index = {name: j for j, name in enumerate(names)}

    def make_cache(self) -> ArraysCache:
        return ArraysCache(size=len(self.names))

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
