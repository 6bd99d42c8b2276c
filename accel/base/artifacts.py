"""Reading the small JSON artifacts that methods load (cache calibrations, learned solvers).

Every problem with a file a user passed is a ``ValueError`` that names the file and the field:
a missing path, a folder, a binary or truncated file, JSON whose top level is not an object, a
field of the wrong type or out of range. Loaders call these instead of indexing raw JSON, so no
``KeyError``/``TypeError``/``UnicodeDecodeError`` from deep inside reaches the user.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]


def read_json_object(path: PathLike, what: str) -> Dict[str, Any]:
    """The JSON object stored in ``path`` (``what`` names the kind of file in messages)."""
    where = os.fspath(path)
    if os.path.isdir(where):
        raise ValueError(f"{what} {where}: is a folder, not a JSON file")
    try:
        with open(where, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise ValueError(f"{what} {where} does not exist") from None
    except OSError as exc:
        raise ValueError(f"{what} {where}: cannot be read ({exc.strerror or exc})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{what} {where}: is not a text file (not JSON)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {where} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {where}: must hold a JSON object, got {type(data).__name__}")
    return data


def artifact_kind(path: PathLike) -> str:
    """The method an artifact file is for: its ``kind`` (teacache, magcache) or, for a learned
    solver, the name in its ``format`` (``accel-dss`` -> dss)."""
    data = read_json_object(path, "artifact")
    kind = data.get("kind")
    if kind is None and isinstance(data.get("format"), str) and data["format"].startswith("accel-"):
        kind = data["format"][len("accel-"):]
    if not isinstance(kind, str):
        raise ValueError(f"artifact {os.fspath(path)}: neither a calibration (no 'kind') nor a learned solver "
                         "(no 'format': 'accel-...')")
    return kind


def shipped_files(folders: Sequence[str], kind: str) -> List[str]:
    """``{kind}-*.json`` in the given folders (an adapter's ``artifact_dirs``), sorted."""
    found = []
    for folder in folders:
        if os.path.isdir(folder):
            found += [os.path.join(folder, name) for name in sorted(os.listdir(folder))
                      if name.startswith(f"{kind}-") and name.endswith(".json")]
    return found


def required(data: Dict[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise ValueError(f"{where}: lacks the field {key!r}")
    return data[key]


def as_int(value: Any, where: str, name: str, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """An integer (``true``/``false`` are not) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{where}: {name} must be in [{low}, {'inf' if high is None else high}], got {value!r}")
    return value


def as_float(value: Any, where: str, name: str, bound: float = 1e9, positive: bool = False) -> float:
    """A finite number of magnitude at most ``bound`` (larger ones are a corrupt file, not a fit)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {name} must be numbers, got {value!r}")
    number = float(value) if abs(value) < 1e300 else math.inf
    if not math.isfinite(number) or abs(number) > bound:
        raise ValueError(f"{where}: {name} must be finite numbers of magnitude <= {bound:g}, got {value!r}")
    if positive and number <= 0:
        raise ValueError(f"{where}: {name} must be positive, got {value!r}")
    return number


def as_float_list(value: Any, where: str, name: str, bound: float = 1e9, positive: bool = False) -> List[float]:
    """A flat list of numbers (``as_float`` each)."""
    if not isinstance(value, list):
        raise ValueError(f"{where}: {name} must be a list of numbers, got {type(value).__name__}")
    return [as_float(v, where, name, bound, positive) for v in value]
