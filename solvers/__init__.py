"""Scheduler swaps and few-step samplers; importing this package registers the solver methods."""
from . import flow_map, learned, student, swap  # noqa: F401  (registration side effects)
