"""The ``[submit]`` table of a job file: what ``shardfix submit`` asks Ray's job server for.

Each :class:`SubmitSpec` field carries its value kind in ``dataclasses.field`` metadata; the table
is validated from those kinds alone. ``python`` is the interpreter the job's entrypoint runs: an
absolute path or a bare name such as ``python3.11``, never shell text.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from shardfix.errors import BadInputError
from shardfix.options import parse_size

SubmitKind = Literal["number", "size", "table of numbers", "table of strings", "list of strings", "interpreter"]

_KIND = "shardfix.submit_kind"
#: A bare interpreter name looked up on the job's PATH.
_BARE_PYTHON = re.compile(r"python[0-9.]*")
#: An absolute interpreter path: no whitespace, quotes or shell metacharacters.
_PYTHON_PATH = re.compile(r"/[A-Za-z0-9._+@/-]+")


def _kind(kind: SubmitKind, default: Any = None, factory: Callable[[], Any] | None = None) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={_KIND: kind})
    return field(default=default, metadata={_KIND: kind})


@dataclass(slots=True)
class SubmitSpec:
    """The ``[submit]`` table: what ``shardfix submit`` asks Ray's job server for."""

    entrypoint_num_cpus: float | None = _kind("number")
    entrypoint_num_gpus: float | None = _kind("number")
    entrypoint_memory: int | None = _kind("size")
    entrypoint_resources: dict[str, float] | None = _kind("table of numbers")
    env_vars: dict[str, str] = _kind("table of strings", factory=dict)
    pip: list[str] | None = _kind("list of strings")
    python: str = _kind("interpreter", "python")
    metadata: dict[str, str] = _kind("table of strings", factory=dict)


#: ``[submit]`` key -> its value kind.
SUBMIT_KEYS: dict[str, SubmitKind] = {f.name: f.metadata[_KIND] for f in fields(SubmitSpec)}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return None
    return float(value)


def _table_of_numbers(value: Any) -> dict[str, float] | None:
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              for v in value.values()):
        return None
    return {k: float(v) for k, v in value.items()}


def _table_of_strings(value: Any) -> dict[str, str] | None:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        return None
    return dict(value)


def _list_of_strings(value: Any) -> list[str] | None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    return list(value)


def _interpreter(value: Any) -> str | None:
    if not isinstance(value, str) or not (_BARE_PYTHON.fullmatch(value) or _PYTHON_PATH.fullmatch(value)):
        return None
    return value


_READERS: dict[str, Callable[[Any], Any]] = {
    "number": _number, "table of numbers": _table_of_numbers, "table of strings": _table_of_strings,
    "list of strings": _list_of_strings, "interpreter": _interpreter,
}
_WANTED = {
    "interpreter": "an interpreter path: an absolute path or a bare name like python3 (no spaces or shell characters)",
}


def read_submit(path: Path, table: Any, unknown_key: Callable[[str, list[str]], BadInputError]) -> SubmitSpec:
    """Validate a job file's ``[submit]`` table.

    Args:
        path: the job file, named in every error.
        table: the parsed ``[submit]`` value.
        unknown_key: builds the error for a key that is not a ``[submit]`` key (with a did-you-mean).

    Returns:
        The submit settings.

    Raises:
        BadInputError: naming the file and the key at fault.
    """
    if not isinstance(table, dict):
        raise BadInputError(f"{path}: [submit] must be a table")
    spec = SubmitSpec()
    for key, value in table.items():
        kind = SUBMIT_KEYS.get(key)
        if kind is None:
            raise unknown_key(key, list(SUBMIT_KEYS))
        if kind == "size":
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise BadInputError(f"{path}: [submit] {key} must be a size, got {value!r}")
            setattr(spec, key, parse_size(value, f"{path}: [submit] {key}"))
            continue
        read = _READERS[kind](value)
        if read is None:
            raise BadInputError(f"{path}: [submit] {key} must be {_WANTED.get(kind, 'a ' + kind)}, got {value!r}")
        setattr(spec, key, read)
    return spec
