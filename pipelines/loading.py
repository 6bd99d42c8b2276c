"""Loading a local diffusers pipeline folder with errors that name the broken file.

``from_pretrained`` on a damaged folder fails deep inside diffusers, transformers or safetensors
(a git-lfs pointer where the weights should be, a download cut short, an empty tokenizer file).
``check_pipeline_folder`` reads what it can cheaply first and says which file is wrong; any other
failure of ``from_pretrained`` is still reported as one ``ValueError`` naming the folder.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Optional

LFS_POINTER = b"version https://git-lfs"


def check_pipeline_folder(path: str, flag: str = "pipeline folder") -> None:
    """``ValueError`` naming the file when ``path`` is not a loadable pipeline folder."""
    if not os.path.isdir(path):
        raise ValueError(f"{flag} {path}: no such folder")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ValueError(f"{flag} {path}: not a diffusers pipeline folder (no model_index.json)")
    for folder, _, files in os.walk(path):
        for name in sorted(files):
            problem = _file_problem(os.path.join(folder, name))
            if problem:
                raise ValueError(f"{flag} {path}: {os.path.relpath(os.path.join(folder, name), path)} {problem}")


def _file_problem(file: str) -> Optional[str]:
    size = os.path.getsize(file)
    with open(file, "rb") as fh:
        head = fh.read(64)
        if head.startswith(LFS_POINTER):
            return "is a git-lfs pointer, not the file (run `git lfs pull`)"
        if file.endswith(".safetensors"):
            if size < 8:
                return "is truncated (not a safetensors file)"
            (header,) = struct.unpack("<Q", head[:8])
            if 8 + header > size:
                return f"is truncated ({size} bytes, its header alone says {8 + header})"
            fh.seek(8)
            try:
                entries = json.loads(fh.read(header))
                end = max((e["data_offsets"][1] for k, e in entries.items() if k != "__metadata__"), default=0)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                return "is not a safetensors file (unreadable header)"
            if 8 + header + end > size:
                return f"is truncated ({size} bytes of {8 + header + end})"
        elif file.endswith(".json"):
            if size > 64 * 2 ** 20:
                return None  # a large tokenizer file: left to its own loader
            fh.seek(0)
            try:
                json.loads(fh.read().decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                return "is empty or not valid JSON" if size else "is empty"
    return None


def load_pipeline(path: str, flag: str = "pipeline folder", pipeline_class: Any = None, **kwargs: Any):
    """``pipeline_class.from_pretrained(path, local_files_only=True, **kwargs)`` with clear errors.

    A path that does not exist is tried as a hub id already in the local cache.
    """
    if pipeline_class is None:
        from diffusers import DiffusionPipeline as pipeline_class
    if os.path.exists(path) or os.path.isabs(path) or path.startswith(".") or path.count("/") != 1:
        check_pipeline_folder(path, flag)  # a path, not a hub id ("org/name")
    try:
        return pipeline_class.from_pretrained(path, local_files_only=True, **kwargs)
    except Exception as exc:  # diffusers/transformers raise many types for a folder they cannot read
        where = "" if os.path.exists(path) else " (not a folder, nor a hub id in the local cache)"
        raise ValueError(f"cannot load {flag} {path}{where}: {type(exc).__name__}: {exc}") from None
