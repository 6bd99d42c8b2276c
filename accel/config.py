"""``accel.Config``: the typed, validated form of everything ``accel.patch`` accepts."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple, Optional, Type

from accel import attention  # noqa: F401  (fills the method registries)
from accel import caching  # noqa: F401
from accel import solvers  # noqa: F401
from accel.base.artifacts import artifact_kind
from accel.base.registry import METHOD_REGISTRIES, method_registry

OFF = (None, "off", "none")
KINDS = tuple(METHOD_REGISTRIES)  # ("attention", "cache", "solver")


class Part(NamedTuple):
    """One resolved method: its registered class and a validated config for it."""

    method: Type
    config: Any

    def build(self):
        return self.method(self.config)


@dataclass(frozen=True)
class Config:
    """Which preset and which method per kind.

    Each of ``attention``/``cache``/``solver`` is a registered method name, that method's config
    dataclass (e.g. ``DenseAttentionConfig()``), or ``None``/``"off"``. Explicit parts override
    the preset's; with neither a preset nor any part, the pipeline's default preset applies.
    ``parts`` holds each given part resolved, once, at construction (``None``: off).
    """

    preset: Optional[str] = None
    attention: Any = None
    cache: Any = None
    solver: Any = None
    parts: Mapping[str, Optional[Part]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.preset is not None and not isinstance(self.preset, str):
            raise ValueError(f"Config.preset must be a preset name (str) or None, got {self.preset!r}")
        given = {kind: resolve_method(kind, getattr(self, kind)) for kind in KINDS
                 if getattr(self, kind) is not None}  # raises ValueError on unknown names/types
        object.__setattr__(self, "parts", MappingProxyType(given))

    @property
    def has_parts(self) -> bool:
        return bool(self.parts)


def resolve_method(kind: str, spec: Any) -> Optional[Part]:
    """The method and config a spec names, or None when the kind is off."""
    registry = method_registry(kind)
    if spec is None or (isinstance(spec, str) and spec in OFF):
        return None
    if isinstance(spec, str) and "+" in spec:
        return _resolve_suffixed(kind, spec)
    if isinstance(spec, str) and spec.endswith(".json"):
        return _resolve_artifact(kind, spec)
    if isinstance(spec, str):
        cls = registry.get(spec)
        return Part(cls, cls.Config())
    if isinstance(spec, dict):  # preset entries: {"name": ..., **params}
        params = dict(spec)
        name = params.pop("name", None)
        if name is None:
            raise ValueError(f"{kind} preset entry needs a 'name', got {spec!r}")
        if isinstance(name, str) and "+" in name:
            return _resolve_suffixed(kind, name, params)
        cls = registry.get(name)
        return Part(cls, cls.Config(**params))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        for _, cls in registry.items():
            if isinstance(spec, cls.Config):
                return Part(cls, spec)
    valid = ", ".join(registry.names()) or "(none yet)"
    raise ValueError(f"{kind} must be a method name ({valid}), one of their config objects, or None/'off'; "
                     f"got {spec!r}")


def _resolve_artifact(kind: str, path: str) -> Part:
    """A fitted artifact's path where a method name goes: the method it was fitted for, loading it
    (``cache="teacache-25.json"``, ``solver="dss-8.json"``)."""
    name = artifact_kind(path)
    registry = method_registry(kind)
    if name not in registry or not getattr(registry.get(name), "artifact_field", None):
        takers = ", ".join(n for n, c in registry.items() if getattr(c, "artifact_field", None)) or "none"
        raise ValueError(f"{kind} {path!r} is a {name} artifact; a {kind} path must be an artifact of {takers}")
    cls = registry.get(name)
    return Part(cls, cls.Config(**{cls.artifact_field: path}))


QUANTIZE_SUFFIXES = ("int8",)


def _takes_quantize(cls: Type) -> bool:
    return dataclasses.is_dataclass(cls.Config) and "quantize" in {f.name for f in dataclasses.fields(cls.Config)}


def _resolve_suffixed(kind: str, spec: str, params: Optional[dict] = None) -> Part:
    """``"radial+int8"``: a sparse pattern whose config's ``quantize`` is the suffix."""
    name, _, suffix = spec.partition("+")
    registry = method_registry(kind)
    cls = registry.get(name)
    if not _takes_quantize(cls):
        takers = ", ".join(n for n, c in registry.items() if _takes_quantize(c)) or "(none)"
        raise ValueError(f"{kind} {spec!r}: only {takers} take a '+quantize' suffix "
                         f"(quantized dense attention is 'int8')")
    if suffix not in QUANTIZE_SUFFIXES:
        raise ValueError(f"{kind} {spec!r}: quantize suffix must be one of "
                         f"{', '.join(map(repr, QUANTIZE_SUFFIXES))}, got {suffix!r}")
    if params and params.get("quantize", suffix) != suffix:
        raise ValueError(f"{kind} {spec!r} says quantize={suffix!r} but its entry also sets "
                         f"quantize={params['quantize']!r}; give one")
    return Part(cls, cls.Config(**{**(params or {}), "quantize": suffix}))
