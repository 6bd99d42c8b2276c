"""accel's ComfyUI nodes, on ComfyUI's own models (``accel comfy install COMFYUI_DIR`` loads them).

ComfyUI with the V3 node API (``comfy_api.latest``) gets ``comfy_entrypoint``; older versions get
the same nodes as ``NODE_CLASS_MAPPINGS`` (ComfyUI reads the mappings first when both exist, so only
one is defined). Outside ComfyUI this package imports without it.
"""
from __future__ import annotations

from .nodes import DISPLAY, legacy_nodes, v3_nodes

try:
    from comfy_api.latest import ComfyExtension
except ImportError:  # ComfyUI without the V3 API, or no ComfyUI at all
    NODE_CLASS_MAPPINGS = legacy_nodes()
    NODE_DISPLAY_NAME_MAPPINGS = dict(DISPLAY)
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
else:
    class AccelExtension(ComfyExtension):
        async def get_node_list(self):
            return v3_nodes()

    async def comfy_entrypoint() -> AccelExtension:
        return AccelExtension()

    __all__ = ["comfy_entrypoint"]
