"""diffusers' context parallelism as methods see it: read from the model, never set up here.

``model.enable_parallelism(config=ContextParallelConfig(...))`` records a ``ParallelConfig`` on
the model (``_parallel_config``) and hands it to every attention processor, which passes it to the
attention dispatcher. These helpers only read it, so they work whichever of ``enable_parallelism``
and ``accel.patch`` came first.
"""
from __future__ import annotations

from typing import Any, Optional


def context_parallel_config(source: Any) -> Optional[Any]:
    """The ``ContextParallelConfig`` in force for a model (or a ``ParallelConfig``), if any."""
    parallel = getattr(source, "_parallel_config", source)
    config = getattr(parallel, "context_parallel_config", None)
    if config is None or getattr(config, "_flattened_mesh", None) is None:
        return None  # not set, or not set up (enable_parallelism sets the meshes up)
    return config


def degrees(config: Any) -> dict:
    """{"ulysses": n, "ring": m} of a context-parallel config."""
    return {"ulysses": int(getattr(config, "ulysses_degree", 1) or 1), "ring": int(getattr(config, "ring_degree", 1) or 1)}


def group_of(config: Any) -> Any:
    """The process group spanning every rank that holds a slice of the same sequence."""
    return config._flattened_mesh.get_group()


def ulysses_rank(config: Any) -> int:
    """This process's position in the Ulysses group (which heads it holds after the all-to-all)."""
    import torch.distributed as dist

    return dist.get_rank(config._ulysses_mesh.get_group())


def summary_of(model: Any) -> Optional[dict]:
    """What ``Handle.summary()`` shows for a model under context parallelism."""
    config = context_parallel_config(model)
    if config is None:
        return None
    import torch.distributed as dist

    group = group_of(config)
    return {**degrees(config), "world_size": dist.get_world_size(group), "rank": dist.get_rank(group)}
