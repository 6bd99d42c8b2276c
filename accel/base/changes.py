"""Record every change made to a pipeline so it can be undone exactly, in reverse order.

Only instances are patched (never classes, never module globals), so other instances of the same
model, and other models, are untouched.
"""
from __future__ import annotations

from typing import Any, Callable, List

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

    def set_parameter(self, module: Any, name: str, value: Any) -> None:
        """Put ``value`` (a tensor) in place of the registered parameter ``name`` of ``module`` (a
        dotted path below it); undo puts the original Parameter object back. ``set_attr`` cannot:
        parameters live in ``_parameters``, not in the instance ``__dict__``."""
        import torch

        owner_path, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        original = owner._parameters[attr]
        owner._parameters[attr] = torch.nn.Parameter(value.to(original.device), requires_grad=original.requires_grad)

        def undo() -> None:
            owner._parameters[attr] = original

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
