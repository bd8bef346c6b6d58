"""Job files: read and validate a TOML job file (``convert --job``) and write one back (``submit``).

A job file holds ``source``, ``output``, an optional ``name`` and ``description``, any ``convert``
option under its field name (validated against :data:`shardfix.options.OPTIONS`: type, choices,
unknown keys with a did-you-mean) and an optional ``[submit]`` table (:mod:`.submit_spec`).
Relative paths resolve against the job file's directory.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardfix.errors import BadInputError
from shardfix.jobs.submit_spec import SubmitSpec, read_submit
from shardfix.options import OPTION_BY_NAME, ConvertOptions

#: Job-file keys that are not convert options.
JOB_KEYS = ("name", "description", "source", "output", "submit")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(slots=True)
class Job:
    """One conversion read from a job file."""

    path: Path
    source: str
    output: str
    options: ConvertOptions
    name: str
    description: str = ""
    submit: SubmitSpec = field(default_factory=SubmitSpec)


def unknown_key(path: Path, key: str, known: list[str], where: str = "") -> BadInputError:
    """The error for a key the job file may not hold, with a did-you-mean where one is close."""
    hint = ""
    if "-" in key and key.replace("-", "_") in known:
        hint = f"; write {key.replace('-', '_')} (flag names with dashes as underscores)"
    else:
        close = difflib.get_close_matches(key, known, n=1)
        if close:
            hint = f"; did you mean {close[0]!r}?"
    return BadInputError(f"{path}: unknown key {key!r}{where}{hint} (job keys: source, output, name, description, "
                         "[submit], and convert's long flag names with dashes as underscores, e.g. vocab_size)")


def _resolve(base: Path, value: str) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _read_toml(p: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise BadInputError(f"--job {p}: no such file") from None
    except OSError as e:
        raise BadInputError(f"--job {p}: cannot read ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise BadInputError(f"{p}: not UTF-8 text ({e})") from e
    except tomllib.TOMLDecodeError as e:
        raise BadInputError(f"{p}: not valid TOML ({e})") from e


def read_options(p: Path, data: dict[str, Any]) -> ConvertOptions:
    """The convert options of a parsed job file, checked key by key against their specs.

    Args:
        p: the job file, named in every error.
        data: the parsed job file; keys that are not options are ignored here.

    Returns:
        The options, with path options resolved against the job file's directory.

    Raises:
        BadInputError: a value of the wrong type, a value outside the option's choices, or any
            other value ``ConvertOptions`` refuses; naming the file and the key.
    """
    base = p.resolve().parent
    kw: dict[str, Any] = {}
    for key, value in data.items():
        o = OPTION_BY_NAME.get(key)
        if o is None:
            continue
        if not o.accepts(value):
            raise BadInputError(f"{p}: {key} must be {o.type_name}, got {value!r}")
        if o.choices is not None and value not in o.choices:
            raise BadInputError(f"{p}: {o.flag}: {value!r} is not one of {', '.join(o.choices)} (job key {key})")
        kw[key] = _resolve(base, value) if o.path else value
    try:
        return ConvertOptions(**kw)
    except BadInputError as e:
        raise BadInputError(f"{p}: {e}") from e


def load_job(path: str | os.PathLike[str]) -> Job:
    """Read and validate a job file; every problem is a :class:`BadInputError` naming the file and key."""
    p = Path(path)
    data = _read_toml(p)
    known = [*JOB_KEYS, *OPTION_BY_NAME]
    for key in data:
        if key not in known:
            raise unknown_key(p, key, known)
    for key in ("source", "output"):
        if key not in data:
            raise BadInputError(f"{p}: missing {key} = \"...\" (the checkpoint to read and the directory to write)")
        if not isinstance(data[key], str) or not data[key]:
            raise BadInputError(f"{p}: {key} must be a non-empty string path, got {data[key]!r}")
    options = read_options(p, data)
    name = data.get("name", p.stem)
    desc = data.get("description", "")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BadInputError(f"{p}: name must be 1-64 letters, digits, '.', '_' or '-', got {name!r}")
    if not isinstance(desc, str):
        raise BadInputError(f"{p}: description must be a string")
    submit = SubmitSpec()
    if "submit" in data:
        submit = read_submit(p, data["submit"], lambda key, known: unknown_key(p, key, known, " in [submit]"))
    base = p.resolve().parent
    return Job(p, _resolve(base, data["source"]), _resolve(base, data["output"]), options, name, desc, submit)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    raise TypeError(f"cannot write {v!r} as TOML")


def job_toml(job: Job) -> str:
    """The job as a self-contained TOML document: absolute paths, options that differ from the defaults."""
    lines = [f"# written by shardfix submit from {job.path.resolve()}",
             f"name = {_toml_value(job.name)}", f"source = {_toml_value(job.source)}",
             f"output = {_toml_value(job.output)}"]
    defaults = ConvertOptions().to_dict()
    for key, value in job.options.to_dict().items():
        if value is not None and value != defaults[key]:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
