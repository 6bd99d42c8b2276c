"""Model adapters, one file per transformer family; importing this package registers them all."""
from . import cogvideox, flux, hunyuan_video, ltx, wan, wan_vace  # noqa: F401  (registration side effects)
