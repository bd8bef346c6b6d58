"""A directory of per-rank ``torch.save`` files, merged into one checkpoint.

Accepted layout: one file per rank, named ``rank_{r}.pt``, ``rank{r}.pt`` or
``<prefix>rank{r}<suffix>.<ext>`` with a prefix and suffix shared by every file (``optim_rank3.pt``,
``ckpt-rank_1-step100.pth``); ``<ext>`` is one of ``.pt .pth .bin .ckpt``. Ranks must run
``0..N-1`` with none missing. Each file is read like a single torch.save file
(``weights_only=True``, mmapped) and holds the same kind of dict (``model``, ``optimizer`` /
``optim`` / ``optimizer_state_dict`` / ``optimizers``, ...). Entries are merged by key:

* optimizer state tensors (``<optimizer container>.state.<id>.<name>``, at least one dim) that
  several ranks hold are dim-0 slices -- rank r's rows of a sharded optimizer such as
  ``DistAdam`` -- and are concatenated in rank order; every rank must hold the key, with the
  same dtype and trailing dims;
* everything else (model tensors, 0-d ``step``, param groups, metadata) held by several ranks is
  a replica: rank order's first copy is used (non-tensor values that differ are noted);
* an entry only one rank holds (the model saved by rank 0, a momentum buffer only its owner
  keeps) is taken from that rank.

Per-rank files that each hold a *full* copy of the optimizer state (DDP) are not dim-0 slices:
convert one rank's file on its own instead.
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, ClassVar

import torch

from shardfix.errors import BadInputError, IncompleteSourceError
from shardfix.sources.base import Chunk, ObjectEntry, PathPart, SourceIndex, TensorEntry
from shardfix.sources.torchsave import _flatten, _lookup, load_torch_file

NAME = "torch-ranks"
DESCRIBE = "a directory of per-rank torch.save files (rank_0.pt, rank_1.pt ... or <prefix>rank<r>.pt)"
_RANK_FILE = re.compile(r"^(?P<prefix>.*?)rank[_-]?(?P<rank>\d+)(?P<suffix>(?:[^0-9].*)?)\.(?P<ext>pt|pth|bin|ckpt)$",
                        re.IGNORECASE)
#: top-level keys that hold optimizer state (kept in step with ``reconcile.keys.OPTIM_CONTAINERS``).
_OPTIM = ("optim", "optimizer", "optimizer_state_dict", "optimizers", "optimizer_states")


def rank_files(path: Path) -> dict[int, Path]:
    """The per-rank files of ``path`` by rank, or {} when it is not such a directory.

    Raises:
        BadInputError: rank files with different prefixes or suffixes (two kinds of files).
    """
    if not path.is_dir():
        return {}
    groups: dict[tuple[str, str, str], dict[int, Path]] = defaultdict(dict)
    try:
        for p in path.iterdir():
            m = _RANK_FILE.match(p.name)
            if m and p.is_file():
                groups[(m["prefix"], m["suffix"], m["ext"])][int(m["rank"])] = p
    except OSError:
        return {}
    if len(groups) > 1:
        kinds = ", ".join(sorted(next(iter(g.values())).name for g in groups.values()))
        raise BadInputError(f"{path}: holds several kinds of per-rank files ({kinds}); put each kind in its own "
                            "directory and convert the one holding the model")
    return next(iter(groups.values()), {})


def detect(path: Path) -> bool:
    """A directory of per-rank torch.save files (and no DCP metadata, which is detected first)."""
    try:
        return bool(rank_files(path))
    except BadInputError:
        return True  # ours; opening it says what is wrong


def open(path: Path, trust_pickle: bool = False) -> TorchRanksSource:  # noqa: A001 - registry verb
    return TorchRanksSource(path, trust_pickle=trust_pickle)


def _is_sharded_state(path: tuple[PathPart, ...], ndim: int) -> bool:
    """An optimizer state tensor (``<container>[.<i>].state.<id>.<name>``) with at least one dim."""
    if ndim == 0 or not path or path[0] not in _OPTIM:
        return False
    rest = path[2:] if len(path) > 1 and isinstance(path[1], int) else path[1:]
    return len(rest) >= 3 and rest[0] == "state"


class TorchRanksSource:
    """Per-rank torch.save files of one save, merged by key."""

    format: ClassVar[str] = NAME

    def __init__(self, path: Path, trust_pickle: bool = False) -> None:
        self.path = path
        self.trust_pickle = trust_pickle
        files = rank_files(path)
        if not files:
            raise BadInputError(f"{path}: no per-rank torch.save files (rank_0.pt, rank_1.pt, ...)")
        n = max(files) + 1
        if n > len(files):  # never list 30 million missing ranks: the count and the first few
            missing = list(itertools.islice((r for r in range(n) if r not in files), 8))
            shown = ", ".join(map(str, missing)) + (f" ... ({n - len(files):,} in all)" if n - len(files) > len(missing) else "")
            raise IncompleteSourceError(
                f"{path}: rank file(s) {shown} are missing of ranks 0..{n - 1}; copy every rank's file, or convert "
                f"{files[min(files)].name} on its own (its sharded optimizer state is then reported as incomplete)"
            )
        self.files = [files[r] for r in range(n)]
        self._objs: dict[int, Any] = {}
        notes: list[str] = [f"merged {n} per-rank torch.save files"]
        per_rank: list[dict[str, TensorEntry | ObjectEntry]] = []
        for r in range(n):
            obj, file_notes = load_torch_file(self.files[r], trust_pickle)
            notes += [f"{self.files[r].name}: {x}" for x in file_notes]
            if not isinstance(obj, dict):
                raise BadInputError(f"{self.files[r]}: holds {type(obj).__name__}, not a dict of state")
            self._objs[r] = obj
            entries: list[TensorEntry | ObjectEntry] = []
            _flatten(obj, (), entries, self.files[r])
            per_rank.append({e.key: e for e in entries})
            ws = obj.get("world_size")
            if isinstance(ws, int) and ws != n:
                raise IncompleteSourceError(
                    f"{self.files[r]}: records world_size {ws} but {path} holds {n} rank files; copy every rank's file"
                )
        self.index = SourceIndex(path, NAME, list(self.files), sum(p.stat().st_size for p in self.files),
                                 self._merge(per_rank, notes), notes)

    def _merge(self, per_rank: list[dict[str, TensorEntry | ObjectEntry]], notes: list[str]) -> list[TensorEntry | ObjectEntry]:
        order: dict[str, None] = {}
        for entries in per_rank:
            order.update(dict.fromkeys(entries))
        merged: list[TensorEntry | ObjectEntry] = []
        differ: list[str] = []
        for key in order:
            held = [(r, entries[key]) for r, entries in enumerate(per_rank) if key in entries]
            r0, first = held[0]
            if isinstance(first, ObjectEntry):
                if any(not _same(first.value, e.value) for _, e in held[1:] if isinstance(e, ObjectEntry)):
                    differ.append(key)
                merged.append(first)
                continue
            if len(held) > 1 and _is_sharded_state(first.path, len(first.shape)):
                merged.append(self._concat(key, held, len(per_rank)))
                continue
            chunk = Chunk(tuple(0 for _ in first.shape), first.shape, self.files[r0].name)
            merged.append(TensorEntry(key, first.path, first.dtype, first.shape, (chunk,), first.stride))
        if differ:
            notes.append(f"{len(differ)} non-tensor entries differ between ranks; the lowest rank's value is used: "
                         + ", ".join(differ[:5]) + (" ..." if len(differ) > 5 else ""))
        return merged

    def _concat(self, key: str, held: list[tuple[int, Any]], n: int) -> TensorEntry:
        """One tensor from every rank's dim-0 slice, in rank order."""
        if len(held) != n:
            ranks = sorted(set(range(n)) - {r for r, _ in held})
            raise IncompleteSourceError(
                f"{self.path}: {key} is a per-rank slice held by ranks {[r for r, _ in held]} but not by {ranks}; "
                "the sharded state cannot be assembled -- copy every rank's file from the same save"
            )
        first = held[0][1]
        chunks, row = [], 0
        for r, e in held:
            if e.dtype != first.dtype or e.shape[1:] != first.shape[1:]:
                raise IncompleteSourceError(
                    f"{self.files[r]}: {key} is {e.dtype} {list(e.shape)} but rank 0's is {first.dtype} "
                    f"{list(first.shape)}; the slices do not belong together (files from different saves?)"
                )
            chunks.append(Chunk((row, *(0 for _ in e.shape[1:])), e.shape, self.files[r].name))
            row += e.shape[0]
        return TensorEntry(key, first.path, first.dtype, (row, *first.shape[1:]), tuple(chunks))

    def read_tensor(self, key: str) -> torch.Tensor:
        entry = self._entry(key)
        parts = []
        for c in entry.chunks:
            r = self._rank_of[c.file or ""]
            value = _lookup(self._objs[r], entry.path)
            if not isinstance(value, torch.Tensor):
                raise BadInputError(f"{self.files[r]}: {key!r} is not a tensor")
            parts.append(value)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def _entry(self, key: str) -> TensorEntry:
        if not hasattr(self, "_by_key"):
            self._by_key = {e.key: e for e in self.index.tensors()}
            self._rank_of = {p.name: r for r, p in enumerate(self.files)}
        try:
            return self._by_key[key]
        except KeyError:
            raise BadInputError(f"{self.path}: no tensor {key!r}") from None

    def close(self) -> None:
        self._objs = {}


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # values whose == is not a bool (arrays) or raises: treat as different
        return False


__all__ = ["TorchRanksSource", "detect", "open", "rank_files"]
