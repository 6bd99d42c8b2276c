"""``accel comfy install COMFYUI_DIR``: a loader package in ComfyUI's ``custom_nodes`` that imports
the accel installed in ComfyUI's Python (``pip install accel-diffusers`` there first)."""
from __future__ import annotations

import os

LOADER_NAME = "accel_nodes"
LOADER = '''"""accel's ComfyUI nodes. Written by `accel comfy install`; the nodes live in the accel package
installed in this Python (`python -m pip install accel-diffusers`, or `-e PATH` of a checkout)."""
import logging

try:
    from accel.comfyui import *  # noqa: F401,F403  (comfy_entrypoint, or NODE_CLASS_MAPPINGS)
except ImportError as error:
    logging.error(f"accel nodes: accel is not importable in this Python ({error}); install it into the Python "
                  "that runs ComfyUI: python -m pip install accel-diffusers")
    raise
'''


def install(comfyui_dir: str) -> str:
    """Write the loader into ``comfyui_dir/custom_nodes``; returns its folder."""
    if not os.path.isfile(os.path.join(comfyui_dir, "main.py")) or not os.path.isdir(os.path.join(comfyui_dir, "comfy")):
        raise ValueError(f"{comfyui_dir} is not a ComfyUI folder (no main.py and comfy/ in it)")
    folder = os.path.join(comfyui_dir, "custom_nodes", LOADER_NAME)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "__init__.py"), "w") as fh:
        fh.write(LOADER)
    return folder
