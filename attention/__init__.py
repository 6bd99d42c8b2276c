"""Attention methods behind one call signature; importing this package registers them."""
from . import dense  # noqa: F401  (registration side effect)
