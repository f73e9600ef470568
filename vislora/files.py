"""Files every module writes the same way: write-then-rename, strict JSON, and one JSON reader with
a clear error.

Standard library only, so any module (and the CLI before torch is imported) can use it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vislora.errors import VisloraError


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """write(tmp) to PATH.tmp, then rename it over PATH: a crash or Ctrl-C leaves the previous file
    whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def finite(value: Any) -> Any:
    """A copy of nested dicts / lists with every NaN or infinite float replaced by None (JSON has no
    NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def to_json(data: Any, indent: int | None = 2) -> str:
    """Standard JSON that jq, JavaScript and strict parsers read: NaN and infinities become null."""
    return json.dumps(finite(data), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> Path:
    """`data` as standard JSON (to_json), written then renamed."""
    text = to_json(data, indent)
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """The JSON content of `path`; a missing file is FileNotFoundError and bad JSON a ValueError,
    both naming the file and what it should be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected the {what})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VisloraError(f"{path} (the {what}) is not valid JSON: {e}") from None


def listing(items, limit: int = 5) -> str:
    """The first `limit` items joined, then '... and N more': a long list of skipped files in one
    line."""
    items = [str(i) for i in items]
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
