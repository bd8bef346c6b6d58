"""The identity of the source bytes each output file is made from, for ``--resume``.

A staged file is reused only when its fingerprint (:meth:`OutputFile.fingerprint`) still matches,
and the fingerprint covers :attr:`OutputFile.source_identity`, set here: for every source file the
output's tensors read, its resolved path, size and ``mtime_ns``, plus a hash of the index entries
(keys, dtypes, shapes, chunk boxes and byte ranges) they were planned from. A staged file made from
step-1000 weights is therefore never reused for step-2000 weights, even when names and shapes
match, nor after a source file was rewritten in place. Only ``stat`` is called; no data is read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shardfix.plan.types import Plan
from shardfix.sources.base import Entry, SourceIndex, TensorEntry


def _stat(path: Path) -> list[Any]:
    try:
        st = os.stat(path)
    except OSError:
        return [str(path), None, None]
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _entry_doc(e: Entry) -> list[Any]:
    if isinstance(e, TensorEntry):
        return [e.key, e.dtype, list(e.shape), e.layout,
                [[list(c.offsets), list(c.sizes), c.file, c.byte_offset, c.length, list(c.transforms)] for c in e.chunks]]
    return [e.key, e.type_name, repr(getattr(e, "value", None))[:4096]]


def _file_lookup(index: SourceIndex) -> dict[str, Path]:
    base = index.path if index.path.is_dir() else index.path.parent
    names: dict[str, Path] = {}
    for f in index.files:
        names.setdefault(f.name, f)
        try:
            names[str(f.relative_to(base))] = f
        except ValueError:
            pass
    return names


def _files_of(entries: Iterable[Entry], index: SourceIndex, lookup: dict[str, Path]) -> list[Path]:
    files: set[Path] = set()
    for e in entries:
        for c in e.chunks if isinstance(e, TensorEntry) else ():
            if c.file is None or c.file not in lookup:
                return list(index.files)  # not traceable to one file: every source file counts
            files.add(lookup[c.file])
        if not isinstance(e, TensorEntry) or not e.chunks:
            return list(index.files)
    return sorted(files)


def _companion_files(plan: Plan) -> list[Path]:
    comp = plan.source.get("companions")
    if not comp:
        return []
    p = Path(comp["path"])
    return sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]


def stamp_source_identity(plan: Plan, index: SourceIndex) -> None:
    """Set ``source_identity`` on every planned output file (see the module docstring)."""
    by_key = index.by_key()
    lookup = _file_lookup(index)
    companions = [_stat(p) for p in _companion_files(plan)]
    for of in plan.files:
        entries = [by_key[t.source] for t in of.tensors if t.origin == "source" and t.source in by_key]
        doc = {
            "files": [_stat(p) for p in _files_of(entries, index, lookup)] if entries else [],
            "entries": [_entry_doc(e) for e in entries],
            "companions": companions if any(t.origin == "companions" for t in of.tensors) else [],
        }
        of.source_identity = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:32]
