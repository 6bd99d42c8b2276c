"""Name -> object registries for model adapters and methods.

Registries are filled by the packages that own the entries (``accel.pipelines`` registers
adapters, ``accel.attention``/``accel.caching``/``accel.solvers`` register methods) when they are
imported; ``accel.api`` and ``accel.config`` import those packages, so every lookup through the
public API sees a full registry.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Tuple


class Registry:
    """A small ordered mapping with errors that list the valid names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Any] = {}

    def register(self, name: str, entry: Any = None) -> Any:
        """Register ``entry`` under ``name``; usable as a decorator when ``entry`` is omitted."""

        def add(obj: Any) -> Any:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return add if entry is None else add(entry)

    def get(self, name: str) -> Any:
        if not isinstance(name, str):
            raise ValueError(f"a {self.kind} is named by a string; got {name!r}")
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names()) or '(none)'}"
            ) from None

    def names(self) -> Tuple[str, ...]:
        return tuple(self._entries)

    def items(self) -> Iterator[Tuple[str, Any]]:
        return iter(tuple(self._entries.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)


# Keyed by the user-facing method name ("dense", "radial", "teacache", "unipc", ...).
ATTENTION_METHODS = Registry("attention method")
CACHE_METHODS = Registry("cache method")
SOLVER_METHODS = Registry("solver")
METHOD_REGISTRIES: Dict[str, Registry] = {
    "attention": ATTENTION_METHODS,
    "cache": CACHE_METHODS,
    "solver": SOLVER_METHODS,
}

# Keyed by transformer class name (e.g. "WanTransformer3DModel"); adapters know which
# diffusers class they serve, so the key is a string and this module never imports diffusers.
MODEL_ADAPTERS = Registry("model family")


def method_registry(kind: str) -> Registry:
    if kind not in METHOD_REGISTRIES:
        raise ValueError(f"unknown method kind {kind!r}; valid kinds: {', '.join(METHOD_REGISTRIES)}")
    return METHOD_REGISTRIES[kind]

