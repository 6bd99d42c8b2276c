"""A source checkout imports as one namespace too: ``accel.<name>`` is the top-level ``<name>/`` folder.

The product card keeps ``attention/``, ``caching/``, ``solvers/``, ... at the repository's top
level, while everything is imported as ``accel.attention``, ``accel.caching``, ... An installed
wheel holds them under ``accel/`` (pyproject's ``package-dir``) and an editable install maps
them with setuptools' finder. A Python started in the repository root imports ``accel/`` from
the working directory before either, so without this finder ``import accel.caching`` there
would fail with ``accel`` half imported. The mapping is derived from the folders, not listed:
every folder next to ``accel/`` that holds an ``__init__.py`` (tests/test_packaging.py checks
that pyproject maps the same ones).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

PACKAGE = "accel"


class SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Finds ``accel.<name>`` in ``<root>/<name>/``; deeper modules follow that package's ``__path__``."""

    def __init__(self, folders: Dict[str, Path]):
        self.folders = folders

    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None, target=None):
        parent, _, name = fullname.rpartition(".")
        folder = self.folders.get(name) if parent == PACKAGE else None
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def source_folders(package_dir: Path) -> Dict[str, Path]:
    """The sibling packages of ``package_dir`` when it sits in a checkout of this repository, else {}."""
    root = package_dir.parent
    if not (root / "pyproject.toml").is_file():
        return {}  # an installed copy: the subpackages live inside accel/
    return {folder.name: folder for folder in sorted(root.iterdir())
            if folder.name != PACKAGE and (folder / "__init__.py").is_file()
            and not (package_dir / folder.name).exists()}


def install(package_dir: Path) -> None:
    """First in ``sys.meta_path``: the subpackages come from the tree ``accel`` itself came from,
    even when an editable install of another checkout maps the same names elsewhere."""
    if any(isinstance(finder, SourceTreeFinder) for finder in sys.meta_path):
        return
    folders = source_folders(package_dir)
    if folders:
        sys.meta_path.insert(0, SourceTreeFinder(folders))
