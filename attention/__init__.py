"""Attention methods behind one call signature; importing this package registers them."""
from . import dense  # noqa: F401  (registration side effect)
from . import sparse  # noqa: F401  (registers spatiotemporal, radial, tile_window, topk, cluster)
from . import quantized  # noqa: F401  (registers int8)
