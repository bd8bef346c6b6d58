"""Sidecar files on disk: staged like the data files, then placed atomically, never over a foreign file.

A :class:`~shardfix.outputs.layout.Sidecar` is rendered (JSON, or the bytes of the file it copies),
written to ``OUT/.shardfix-staging/<name>`` under a temporary name, fsynced and renamed, and its
size and xxh3-128 recorded on it (the report lists both; ``verify`` checks them). Only when every
data file is in place does the layout move the staged sidecars into ``OUT``. A file already at a
sidecar's place that shardfix did not write (different bytes) is never replaced: :func:`check_placeable`
refuses it before anything is moved.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import xxhash

from shardfix.errors import BadInputError, OutputError
from shardfix.outputs.layout import Sidecar
from shardfix.outputs.writer import file_checksum, write_bytes_atomic


def safe_relative(name: str) -> bool:
    """Whether ``name`` is a plain relative path inside the output directory (no ``..``, no hidden parts)."""
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and all(part not in ("", ".", "..") and not part.startswith(".")
                                                      for part in p.parts) and "\\" not in name


def render(side: Sidecar) -> bytes:
    """The bytes of ``side``: its JSON document (indented, newline-terminated) or the file it copies."""
    if side.copy_from is not None:
        try:
            return Path(side.copy_from).read_bytes()
        except OSError as e:
            raise BadInputError(f"{side.copy_from}: cannot read ({e.strerror}); needed for {side.name}") from e
    return (json.dumps(side.content, indent=2) + "\n").encode()


def stage(staging: Path, side: Sidecar) -> None:
    """Write ``side`` into ``staging`` (temporary name, fsync, rename) and record its size and checksum."""
    if not safe_relative(side.name):
        raise OutputError(f"sidecar name {side.name!r} is not a plain relative path")
    data = render(side)
    path = staging / side.name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data, "; rerun with --resume")
    side.bytes = len(data)
    side.checksum = xxhash.xxh3_128_hexdigest(data)


def check_placeable(out: Path, sides: Iterable[Sidecar]) -> None:
    """Refuse (before anything moves) when a sidecar's place holds a file shardfix did not write.

    A file with exactly the staged bytes is taken as ours (an earlier run of the same conversion).
    """
    for side in sides:
        dest = out / side.name
        if dest.is_dir() or (dest.exists() and file_checksum(dest) != side.checksum):
            raise OutputError(f"{dest}: already exists and shardfix did not write it; refusing to replace it "
                              f"with the converted {side.what or side.name} -- move it away or pick a new directory")


def place(out: Path, staging: Path, side: Sidecar) -> None:
    """Move a staged sidecar into ``out`` (atomic rename within one filesystem)."""
    dest = out / side.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging / side.name, dest)
