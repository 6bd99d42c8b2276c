"""Import a ComfyUI from its folder into this process (for ``accel bench comfyui`` and the tests).

ComfyUI is an application, not a package: its modules (``comfy``, ``comfy_api``, ``nodes``, ...) are
top-level names in its folder, and it reads its command line when ``comfy.cli_args`` is imported.
On a machine without CUDA it must be told ``--cpu`` before ``comfy.model_management`` is imported.
"""
from __future__ import annotations

import os
import sys

import torch


def use_comfyui(folder: str) -> None:
    """Put ComfyUI's folder on ``sys.path`` (after everything else) and configure it for this device."""
    folder = os.path.abspath(folder)
    if not os.path.isfile(os.path.join(folder, "comfy", "model_management.py")):
        raise ValueError(f"{folder} is not a ComfyUI folder (no comfy/model_management.py in it)")
    if folder not in sys.path:
        sys.path.append(folder)
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (reads the args once)
