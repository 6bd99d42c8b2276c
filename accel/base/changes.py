"""Record every change made to a pipeline so it can be undone exactly, in reverse order.

Only instances are patched (never classes), so other instances of the same model are untouched.
The single exception is a module-global function that a library calls by name (diffusers'
``dispatch_attention_fn``); such globals are swapped once, shared by every handle through a
reference count, and the replacement passes calls straight through unless a patched module is
running (see ``attention/intercept.py``).
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List, Tuple

_MISSING = object()


class ChangeLog:
    """An undo stack. Each ``set_attr``/hook registration pushes the action that reverts it."""

    def __init__(self) -> None:
        self._undo: List[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._undo)

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name = value`` on the instance; undo restores the previous instance state.

        If the attribute came from the class (a method, a class default), undo deletes the
        instance attribute so lookup falls back to the class exactly as before.
        """
        previous = obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else _MISSING
        setattr(obj, name, value)

        def undo() -> None:
            if previous is _MISSING:
                if name in getattr(obj, "__dict__", {}):
                    delattr(obj, name)
            else:
                setattr(obj, name, previous)

        self._undo.append(undo)

    def set_class(self, obj: Any, cls: type) -> None:
        """Give one instance the class ``cls`` (a subclass of its own); undo gives the old one back.

        The cache engine gates a block this way (``caching.diffusers_host.gated_class``): the instance
        stays where it is in the module tree, so names and ``state_dict`` keys do not change.
        """
        old = type(obj)
        if not issubclass(cls, old):
            raise TypeError(f"{cls.__name__} is not a subclass of {old.__name__}")
        obj.__class__ = cls

        def undo() -> None:
            if type(obj) is not cls:
                raise RuntimeError(f"the class of a {old.__name__} instance was changed by someone else; "
                                   "left as it is")
            obj.__class__ = old

        self._undo.append(undo)

    def on_undo(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def keep_handle(self, removable: Any) -> None:
        """Track a torch ``RemovableHandle`` (forward hooks) for removal."""
        self._undo.append(removable.remove)

    def undo_all(self) -> None:
        errors = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as exc:  # keep undoing the rest; report after
                errors.append(exc)
        if errors:
            raise RuntimeError(f"{len(errors)} change(s) could not be undone: {errors[0]!r}") from errors[0]


_shared_lock = threading.Lock()
_shared: Dict[Tuple[int, str], Dict[str, Any]] = {}


def acquire_global(namespace: Any, name: str, make_replacement: Callable[[Any], Any], changes: ChangeLog) -> Any:
    """Swap ``namespace.name`` for ``make_replacement(original)``, shared across handles.

    The first acquirer installs the replacement; each acquirer's ``changes`` releases one
    reference, and the last release restores the original. Returns the original.
    """
    key = (id(namespace), name)
    with _shared_lock:
        entry = _shared.get(key)
        if entry is None:
            original = getattr(namespace, name)
            replacement = make_replacement(original)
            setattr(namespace, name, replacement)
            entry = _shared[key] = {"original": original, "replacement": replacement, "count": 0}
        entry["count"] += 1

    def release() -> None:
        with _shared_lock:
            entry["count"] -= 1
            if entry["count"] == 0:
                # Restore only if nobody replaced our replacement meanwhile; otherwise leave theirs.
                if getattr(namespace, name) is entry["replacement"]:
                    setattr(namespace, name, entry["original"])
                del _shared[key]

    changes.on_undo(release)
    return entry["original"]
