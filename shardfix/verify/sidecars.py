"""``verify`` of the sidecar files (config.json, tokenizer files, adapter config, param groups ...).

Each sidecar the report lists under ``outputs.sidecars`` must be present with the size and
xxh3-128 checksum recorded when it was staged; a name that leaves the output directory is a
problem, never a path to read. Stray ``*.safetensors`` files in ``adapter/`` are reported as
``verify`` reports them at the top level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shardfix.outputs.hf import ADAPTER_DIR
from shardfix.outputs.sidecars import safe_relative
from shardfix.outputs.writer import file_checksum


def check_sidecars(out: Path, report: dict[str, Any], listed: set[str], problems: list[str]) -> None:
    """Append a problem for every sidecar missing, changed or malformed in the report.

    Args:
        out: the output directory.
        report: the loaded report.
        listed: the data files the report lists (for the stray-file check in ``adapter/``).
        problems: where problems go.
    """
    sides = report["outputs"].get("sidecars") or []
    if not isinstance(sides, list):
        problems.append(f"{out}: the report's outputs.sidecars is not a list")
        return
    for i, side in enumerate(sides):
        name = side.get("name") if isinstance(side, dict) else None
        if not isinstance(name, str) or not safe_relative(name) or not isinstance(side.get("checksum"), str):
            problems.append(f"{out}: the report's outputs.sidecars[{i}] is malformed")
            continue
        path = out / name
        if not path.is_file():
            problems.append(f"{path}: missing ({side.get('what') or 'sidecar'} listed in the report)")
            continue
        size = path.stat().st_size
        if side.get("bytes") is not None and size != side["bytes"]:
            problems.append(f"{path}: {size} bytes, the report says {side['bytes']}")
        elif file_checksum(path) != side["checksum"]:
            problems.append(f"{path}: checksum differs from the report's (the file changed after it was written)")
    for p in sorted((out / ADAPTER_DIR).glob("*.safetensors")):
        if f"{ADAPTER_DIR}/{p.name}" not in listed:
            problems.append(f"{p}: not in the report (a stray adapter file)")
