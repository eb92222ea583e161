"""Build RFC 6902 JSON patch operations directly against the incoming pod.

The pod is never copied or round-tripped through a model: steps ask the
builder to add things, and the builder emits the fewest `add`/`replace`
operations that do it. Containers the patch itself creates (a missing
`volumes` list, a missing `affinity`) are owned by the builder and later
additions are folded into them, so two steps that both append to an absent
list still produce one operation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Token = str | int
Path = tuple[Token, ...]
PatchOp = dict[str, Any]

_MISSING = object()


def pointer(path: Path) -> str:
    """RFC 6901 JSON pointer for a path of keys and list indexes."""
    return "".join("/" + str(t).replace("~", "~0").replace("/", "~1") for t in path)


def _step(node: Any, token: Token) -> Any:
    if isinstance(token, int):
        if isinstance(node, list) and 0 <= token < len(node):
            return node[token]
        return _MISSING
    # dict, not Mapping: the pod is parsed JSON, and the ABC check costs more.
    if isinstance(node, dict):
        value = node.get(token, _MISSING)
        # A JSON null is as good as absent: `add` replaces it.
        return _MISSING if value is None else value
    return _MISSING


def lookup(doc: Any, path: Sequence[Token]) -> Any:
    """Value at path in doc, or None when any step is absent."""
    node = doc
    for token in path:
        node = _step(node, token)
        if node is _MISSING:
            return None
    return node


def _set_nested(node: Any, path: Path, value: Any) -> None:
    for token in path[:-1]:
        child = _step(node, token)
        if child is _MISSING:
            child = node[token] = {}
        node = child
    node[path[-1]] = value


class PatchBuilder:
    def __init__(self, doc: Mapping[str, Any]) -> None:
        self._doc = doc
        self._ops: list[PatchOp] = []
        # Values this patch adds at a path the document did not have; they are
        # still ours to extend in place until the patch is serialised.
        self._owned: dict[Path, Any] = {}

    @property
    def ops(self) -> list[PatchOp]:
        return self._ops

    def _owned_value(self, path: Path) -> Any:
        """The value at path if it lies inside something this patch created."""
        for owned_path, value in self._owned.items():
            if path[: len(owned_path)] == owned_path:
                return lookup(value, path[len(owned_path) :])
        return None

    def get(self, path: Path) -> Any:
        """The value at path as the patched document will have it (None if absent)."""
        owned = self._owned_value(path)
        return owned if owned is not None else lookup(self._doc, path)

    def set(self, path: Path, value: Any) -> None:
        """Make path hold value, creating missing parent objects in one operation."""
        for owned_path, owned in self._owned.items():
            if len(path) > len(owned_path) and path[: len(owned_path)] == owned_path:
                _set_nested(owned, path[len(owned_path) :], value)
                return
        if lookup(self._doc, path) is not None:
            self._ops.append({"op": "replace", "path": pointer(path), "value": value})
            return
        # Add the nested remainder at the shallowest level the document lacks.
        depth = len(path)
        while depth > 1 and lookup(self._doc, path[: depth - 1]) is None:
            depth -= 1
        nested = value
        for token in reversed(path[depth:]):
            nested = {token: nested}
        self._ops.append({"op": "add", "path": pointer(path[:depth]), "value": nested})
        self._owned[path[:depth]] = nested

    def append(self, path: Path, item: Any) -> None:
        """Append item to the list at path, creating the list if it is absent."""
        owned = self._owned_value(path)
        if isinstance(owned, list):
            owned.append(item)
        elif isinstance(lookup(self._doc, path), list):
            self._ops.append({"op": "add", "path": pointer(path) + "/-", "value": item})
        else:
            self.set(path, [item])

    def insert(self, path: Path, index: int, item: Any) -> None:
        """Insert item at index of the list at path, creating the list if absent."""
        existing = lookup(self._doc, path)
        if isinstance(existing, list) and 0 <= index <= len(existing) and existing:
            self._ops.append({"op": "add", "path": pointer((*path, index)), "value": item})
        else:
            self.append(path, item)
