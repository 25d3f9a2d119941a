"""Per-model state with a hard bound on the number of keys: a name that finds no room shares
one overflow key, so arbitrary model names in requests cannot grow memory."""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

OVERFLOW_KEY = "__other__"
S = TypeVar("S")


class KeyTable(Generic[S]):
    """At most ``max_keys`` states; keys are created only by learning (``slot`` then store)."""

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self.states: dict[str, S] = {}

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.states))

    def get(self, key: str) -> S | None:
        """State of a key; a name that found no room reads the shared overflow state."""
        st = self.states.get(key)
        if st is None and len(self.states) >= self.max_keys - 1:
            st = self.states.get(OVERFLOW_KEY)
        return st

    def resolve(self, key: str) -> str | None:
        """Which stored key ``get`` reads for a name: its own, the overflow key, or None (priors)."""
        if key in self.states:
            return key
        if len(self.states) >= self.max_keys - 1 and OVERFLOW_KEY in self.states:
            return OVERFLOW_KEY
        return None

    def slot(self, key: str) -> str:
        """The key a new observation is stored under: its own while there is room (one slot
        stays for the overflow key, so the table never exceeds ``max_keys``)."""
        if key in self.states or len(self.states) < self.max_keys - 1:
            return key
        return OVERFLOW_KEY

    def reset(self, key: str) -> bool:
        """Forget the state a name reads (its own or, past the bound, the shared one)."""
        stored = self.resolve(key)
        if stored is None:
            return False
        del self.states[stored]
        return True


def bounded_keys(keys: dict, max_keys: int) -> list[tuple[str, object]]:
    """At most ``max_keys`` entries of a snapshot's keys, the shared overflow key kept when present
    (restoring into a smaller table must not exceed its bound once the overflow key is needed)."""
    items = [(str(k), v) for k, v in keys.items() if k != OVERFLOW_KEY][: max_keys - 1]
    if OVERFLOW_KEY in keys:
        items.append((OVERFLOW_KEY, keys[OVERFLOW_KEY]))
    return items


class TableKeys:
    """The key methods of the ``Estimator`` protocol for an estimator whose state per model lives
    in ``self.table`` (a ``KeyTable``)."""

    table: KeyTable

    def keys(self) -> list[str]:
        return list(self.table)

    def resolve(self, key: str) -> str | None:
        return self.table.resolve(key)

    def slot(self, key: str) -> str:
        return self.table.slot(key)

    def reset(self, key: str) -> bool:
        return self.table.reset(key)
