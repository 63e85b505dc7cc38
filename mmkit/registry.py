"""One small registry for everything mmkit looks up by name: attention backends, encoder families,
connectors, diffusion patches, data sources, CLI commands.

Registration is explicit (the package that owns the things registers them, by name, in one place) and a
duplicate name raises instead of silently replacing; an unknown name gets a did-you-mean and the list::

    CONNECTORS = Registry("connector kind")
    CONNECTORS.register("linear", LinearConnector)
    CONNECTORS.get("linaer")  # ValueError: unknown connector kind 'linaer'; did you mean 'linear'? accepted: ...
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named things of one sort. ``what`` names the sort in messages ("connector kind", "data source")."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T, *, replace: bool = False) -> T:
        """Add ``item`` under ``name``; a name already taken raises unless ``replace=True``. Returns ``item``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} name must be a non-empty string, got {name!r}")
        if name in self._items and not replace and self._items[name] is not item:
            raise ValueError(f"{self.what} {name!r} is already registered ({self._items[name]!r}); "
                             f"pick another name or pass replace=True")
        self._items[name] = item
        return item

    def decorator(self, name: str, *, replace: bool = False) -> Callable[[T], T]:
        """``@REGISTRY.decorator("name")`` for a function or class defined next to where it is registered."""
        return lambda item: self.register(name, item, replace=replace)

    def unregister(self, name: str) -> T:
        """Remove and return ``name`` (tests and plug-ins that replace a built-in)."""
        return self._items.pop(self._check(name))

    def get(self, name: str, *, among: list[str] | None = None, what: str | None = None) -> T:
        """The thing registered as ``name``. ``among`` narrows the accepted names (e.g. the adapter kinds of
        one family) and ``what`` renames the sort in the error."""
        return self._items[self._check(name, among, what)]

    def _check(self, name: str, among: list[str] | None = None, what: str | None = None) -> str:
        accepted = self.names() if among is None else sorted(among)
        if name in self._items and name in accepted:
            return name
        close = difflib.get_close_matches(str(name), accepted, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ";"
        raise ValueError(f"unknown {what or self.what} {name!r}{hint} accepted: "
                         f"{', '.join(accepted) or '(none registered)'}")

    def names(self) -> list[str]:
        """Registered names, sorted (for messages and listings)."""
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """(name, thing) pairs in registration order (the order built-ins were declared in)."""
        return list(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self.names())})"
