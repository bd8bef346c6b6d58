"""The output directory's manifest: which files in OUT shardfix wrote, with their checksums.

``OUT/.shardfix-manifest.json`` lists every file shardfix places into OUT -- data files, index
files, sidecars of any layout, the report -- by name, with its size and xxh3-128. It is written
atomically and updated *before* a file is placed, so a file in OUT that the manifest does not list
with a matching size and checksum is not shardfix's (the user added or edited it), whatever its
name. ``--overwrite`` and ``--resume`` remove or replace only files the manifest proves are ours.
It also records that shardfix created ``OUT/.shardfix-staging``; a staging directory the manifest
does not vouch for is never written through.

Nothing here knows the layout: names come from whoever places the file.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import xxhash

from shardfix.outputs.layout import STAGING
from shardfix.outputs.writer import file_checksum, write_json_atomic

MANIFEST_NAME = ".shardfix-manifest.json"
#: The lock file a run holds (``fcntl.flock``) while it writes into OUT.
LOCK_NAME = ".shardfix-lock"
#: Names in OUT that are shardfix's bookkeeping, not outputs.
INTERNAL_NAMES = (MANIFEST_NAME, LOCK_NAME, STAGING)
#: Checksums kept per name: the report is placed twice (an "incomplete" marker, then the final one).
_KEEP = 2
_SCHEMA = 1


def _regular(path: Path) -> os.stat_result | None:
    """``lstat`` of ``path`` if it is a regular file (not a link, FIFO, device or directory), else None."""
    try:
        st = path.lstat()
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


class Manifest:
    """The manifest of one output directory (see the module docstring)."""

    def __init__(self, out: Path, files: dict[str, list[dict[str, Any]]] | None = None, staging: bool = False) -> None:
        self.out = out
        self.files: dict[str, list[dict[str, Any]]] = files or {}
        self.staging = staging

    @classmethod
    def load(cls, out: Path) -> Manifest | None:
        """The manifest in ``out``, or None when there is none (or it is not a readable regular file)."""
        path = out / MANIFEST_NAME
        if _regular(path) is None:
            return None
        try:
            doc = json.loads(path.read_text())
            files = {str(k): [dict(e) for e in v if isinstance(e, dict)] for k, v in doc["files"].items()}
            return cls(out, files, bool(doc.get("staging")))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def save(self) -> None:
        write_json_atomic(self.out / MANIFEST_NAME,
                          {"schema": _SCHEMA, "tool": "shardfix", "staging": self.staging, "files": self.files})

    def owns(self, name: str, known: tuple[int, str] | None = None) -> bool:
        """Whether ``OUT/name`` is a regular file whose size and checksum the manifest lists."""
        entries = self.files.get(name)
        st = _regular(self.out / name)
        if not entries or st is None:
            return False
        sized = [e for e in entries if e.get("bytes") == st.st_size]
        if not sized:
            return False
        digest = known[1] if known is not None and known[0] == st.st_size else file_checksum(self.out / name)
        return any(e.get("xxh3_128") == digest for e in sized)

    def add(self, name: str, nbytes: int, checksum: str) -> None:
        """Record that ``name`` will hold these bytes (call :meth:`save` before placing the file)."""
        entry = {"bytes": nbytes, "xxh3_128": checksum}
        kept = [e for e in self.files.get(name, []) if e != entry]
        self.files[name] = [*kept, entry][-_KEEP:]

    def add_bytes(self, name: str, data: bytes) -> None:
        self.add(name, len(data), xxhash.xxh3_128_hexdigest(data))

    def forget(self, name: str) -> None:
        self.files.pop(name, None)


def entries(out: Path, skip: tuple[str, ...] = INTERNAL_NAMES) -> list[str]:
    """Files in ``out`` (relative POSIX paths, subdirectories such as ``adapter/`` included) other than
    shardfix's bookkeeping, sorted. Symlinks count as entries and are never followed."""
    found: list[str] = []
    for root, dirs, files in os.walk(out):
        rel = Path(root).relative_to(out)
        if rel == Path("."):
            dirs[:] = [d for d in dirs if d not in skip]
            files = [f for f in files if f not in skip]
        found += [(rel / d).as_posix() for d in dirs if os.path.islink(os.path.join(root, d))]
        found += [(rel / f).as_posix() for f in files]
    return sorted(found)


def split_owned(out: Path, manifest: Manifest | None) -> tuple[list[str], list[str]]:
    """(files shardfix provably wrote, everything else) among :func:`entries`."""
    owned: list[str] = []
    foreign: list[str] = []
    for name in entries(out):
        (owned if manifest is not None and manifest.owns(name) else foreign).append(name)
    return owned, foreign
