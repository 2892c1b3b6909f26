"""A registry of named entries: what each ``register_*``, ``get_*`` and ``list_*`` of one kind
share (docs/design.md §2).

``get`` raises a :class:`layerlie.LayerlieError` that lists the valid names, ``names`` returns
them sorted, and ``items`` keeps the order of registration.

Example:
    >>> from layerlie.core.registry import Registry
    >>> colours = Registry("colour")
    >>> colours.add("red", "#f00")
    >>> colours.get("red"), colours.names()
    ('#f00', ['red'])
"""

from __future__ import annotations

from typing import Generic, TypeVar

from layerlie.errors import LayerlieError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one kind by name.

    Args:
        kind: the kind, as an error message names it (``"measure"``).
        plural: its plural (default: ``kind + "s"``).
    """

    def __init__(self, kind: str, plural: str | None = None) -> None:
        self.kind, self.plural = kind, plural or f"{kind}s"
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> None:
        """Register ``entry`` under ``name``, replacing an entry of that name."""
        self._entries[name] = entry

    def get(self, name: str) -> T:
        """The entry of ``name``.

        Raises:
            LayerlieError: an unknown name; the message lists the valid ones.
        """
        if name not in self._entries:
            raise LayerlieError(f"unknown {self.kind} {name!r}; valid {self.plural}: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """The names and entries, in the order they were registered."""
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries
