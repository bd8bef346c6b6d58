"""Several opened sources seen as one checkpoint (a training stack's output directory).

A training stack often leaves the model and the optimizer in different files or directories
(accelerate's ``pytorch_model_fsdp_0/`` + ``optimizer_0/``, the Trainer's ``model.safetensors``
+ ``optimizer.pt``). :class:`CompositeSource` merges their indexes: each part's entries keep a
key that names where they really live (``<part label>/<key in that part>``, e.g.
``optimizer_0/optimizer.state.fc.weight.exp_avg``), so the ledger points at the real file, and
get a *path* rewritten to the containers the classifier knows (``("model", fqn)``,
``("optimizers", i, "state", ...)``). Reads are dispatched to the part that holds the key.

Files the layout does not convert are listed on ``index.not_converted`` (one
``{"file", "reason"}`` each); small facts read from them (step, epoch) become object entries
under a ``("training_state", ...)`` path, which the planner reports in ``findings.metadata``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shardfix.errors import BadInputError
from shardfix.sources.base import ByteRange, Entry, ObjectEntry, PathPart, Source, SourceIndex

PathMap = Callable[[tuple[PathPart, ...]], tuple[PathPart, ...]]


def under(*prefix: PathPart) -> PathMap:
    """A path map that puts a part's entries under ``prefix`` (``under("model")``)."""
    return lambda path: (*prefix, *path)


def replace_head(new: tuple[PathPart, ...]) -> PathMap:
    """A path map that replaces the first component (``optimizer_0`` -> ``("optimizers", 0)``)."""
    return lambda path: (*new, *path[1:])


def keep(path: tuple[PathPart, ...]) -> tuple[PathPart, ...]:
    return path


@dataclass(slots=True)
class Part:
    """One opened source inside a layout.

    Attributes:
        label: where it lives, relative to the layout's directory; prefixes its keys (``""``: keys as they are).
        source: the opened source.
        path_map: rewrites each entry's path for the classifier.
    """

    label: str
    source: Source
    path_map: PathMap = keep


@dataclass(slots=True)
class Facts:
    """Small values read from a file the layout does not convert (``trainer_state.json``)."""

    file: str
    values: dict[str, Any] = field(default_factory=dict)


class CompositeSource:
    """Parts merged into one index; reads go to the part holding the key."""

    def __init__(self, path: Path, format_name: str, parts: list[Part], *, facts: list[Facts] | None = None,
                 not_converted: list[dict[str, str]] | None = None, notes: list[str] | None = None) -> None:
        self.path = path
        self.format = format_name
        self._parts = parts
        self._where: dict[str, tuple[Source, str]] = {}
        entries: list[Entry] = []
        seen_paths: dict[tuple[PathPart, ...], str] = {}
        files: list[Path] = []
        total = 0
        all_notes: list[str] = list(notes or [])
        for part in parts:
            idx = part.source.index
            files += idx.files
            total += idx.total_bytes
            all_notes += [f"{part.label}: {n}" if part.label else n for n in idx.notes]
            for e in idx.entries:
                key = f"{part.label}/{e.key}" if part.label else e.key
                new_path = part.path_map(e.path)
                if key in self._where or new_path in seen_paths:
                    other = seen_paths.get(new_path, key)
                    raise BadInputError(f"{path}: {key} and {other} are the same entry of the checkpoint; the "
                                        "directory mixes two saves -- keep one of them")
                seen_paths[new_path] = key
                self._where[key] = (part.source, e.key)
                entries.append(dataclasses.replace(e, key=key, path=new_path))
        for f in facts or []:
            for name, value in f.values.items():
                entries.append(ObjectEntry(f"{f.file}/{name}", ("training_state", name), value, type(value).__name__))
            files.append(path / f.file)
            total += (path / f.file).stat().st_size
        self.index = SourceIndex(path, format_name, files, total, entries, all_notes)
        self.index.not_converted = list(not_converted or [])

    def _part(self, key: str) -> tuple[Source, str]:
        try:
            return self._where[key]
        except KeyError:
            raise BadInputError(f"{self.path}: no entry {key!r} in the checkpoint") from None

    def read_tensor(self, key: str) -> torch.Tensor:
        src, inner = self._part(key)
        return src.read_tensor(inner)

    def byte_ranges(self, key: str) -> list[ByteRange] | None:
        src, inner = self._part(key)
        fn = getattr(src, "byte_ranges", None)
        return fn(inner) if fn is not None else None

    def close(self) -> None:
        for part in self._parts:
            part.source.close()
