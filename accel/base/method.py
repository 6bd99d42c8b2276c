"""The contract every method (attention, cache, solver) implements, and what it attaches to."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Set

import torch

from .adapter import ModelAdapter
from .changes import ChangeLog
from .config import config_params
from .context import StepContext, TokenLayout


@dataclass
class PatchSession:
    """What one ``accel.patch`` call is patching, shared by all of its methods.

    ``models`` are the transformers of the pipeline that the adapter serves (two for Wan 2.2);
    ``layouts`` holds the token layout of each model's call in flight, set by the step tracker.
    """

    pipe: Any  # the diffusers pipeline, or None when a bare transformer was patched
    models: List[torch.nn.Module]
    adapter: ModelAdapter
    step: StepContext
    changes: ChangeLog
    layouts: Dict[int, TokenLayout] = field(default_factory=dict)

    @property
    def scheduler(self) -> Any:
        return getattr(self.pipe, "scheduler", None)

    def layout_of(self, model: torch.nn.Module) -> TokenLayout:
        return self.layouts.get(id(model), TokenLayout())


class Method:
    """Base class of every registered method.

    ``Config`` is the method's config dataclass (validated on construction). ``attach`` makes all
    its changes through ``session.changes`` so that ``Handle.remove`` can undo them.
    """

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    Config: ClassVar[type]

    def __init__(self, config: Any):
        self.config = config
        self._warned: Set[str] = set()

    def attach(self, session: PatchSession) -> None:
        raise NotImplementedError

    def counters(self) -> Dict[str, Any]:
        """Per-method counters for ``Handle.summary`` (filled by each method)."""
        return {}

    def idle_warning(self) -> Optional[str]:
        """Why the method changed nothing so far although the model ran (a cache that reused no
        step, attention that fell back on every call), or None: ``Handle.summary`` shows it."""
        return None

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, "params": config_params(self.config), "counters": self.counters()}

    def warn_once(self, reason: str) -> None:
        """One warning per distinct reason per method instance, so a fallback is loud but not spammy."""
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"accel {self.kind} {self.name!r}: {reason}", RuntimeWarning, stacklevel=3)
