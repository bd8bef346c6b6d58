"""torch's ``HuggingFaceStorageWriter(save_distributed=True)`` output: per-rank safetensors shards.

Each rank writes ``shard-{r:05d}-model-{i:05d}-of-{n:05d}.safetensors`` (``r`` counts ranks
from 1) holding only its own rows of each tensor. Where those rows sit in the global tensor is
in the file's safetensors ``__metadata__`` under ``DCP_SHARDING_INFO``: a JSON object
``{fqn: {"saved_offsets": [...]}}``. The global shape is not stored anywhere; like torch's own
reader, it is the far corner of the boxes (``max(offset + size)`` per dim). Boxes are then
checked to tile that shape exactly with the DCP tiling check, and the shard numbers must run
1..R without a gap. A missing *last* rank whose rows were the tensor's tail cannot be told
from a smaller tensor -- the format does not record it -- so the index notes the rank count.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar

import torch

from shardfix.dtypes import torch_dtype
from shardfix.errors import BadInputError, IncompleteSourceError
from shardfix.io.preads import fill
from shardfix.io.regular import open_regular
from shardfix.io.st_header import read_header
from shardfix.sources.base import ByteRange, Chunk, ObjectEntry, SourceIndex, TensorEntry
from shardfix.sources.tiling import check_tiling

NAME = "hf-distributed"
DESCRIBE = "torch HuggingFaceStorageWriter(save_distributed=True) shards (shard-0000r-model-0000i-of-0000n.safetensors)"
SHARD_NAME = re.compile(r"^shard-(\d{5})-model-(\d{5})-of-(\d{5})\.safetensors$")
SHARDING_KEY = "DCP_SHARDING_INFO"
OFFSETS_KEY = "saved_offsets"


def shard_files(path: Path) -> list[tuple[int, Path]]:
    """The ``(rank number, file)`` pairs of a directory, in rank then file order."""
    if not path.is_dir():
        return []
    try:
        found = [(int(m.group(1)), int(m.group(2)), p) for p in path.iterdir() if (m := SHARD_NAME.match(p.name))]
    except OSError:
        return []
    return [(r, p) for r, _, p in sorted(found)]


def detect(path: Path) -> bool:
    """A directory holding ``shard-NNNNN-model-NNNNN-of-NNNNN.safetensors`` files."""
    return bool(shard_files(path))


def open(path: Path, trust_pickle: bool = False) -> HfDistributedSource:  # noqa: A001 - registry verb
    """Open the shards (``trust_pickle`` is unused: safetensors hold no pickles)."""
    return HfDistributedSource(path)


def _sharding_info(file: Path, metadata: dict[str, str] | None) -> dict[str, Any]:
    raw = (metadata or {}).get(SHARDING_KEY)
    if raw is None:
        raise BadInputError(f"{file}: a shard-*.safetensors file without {SHARDING_KEY} in its metadata; it was not "
                            "written by HuggingFaceStorageWriter(save_distributed=True) -- pass a directory of such shards")
    try:
        info = json.loads(raw)
    except ValueError as e:
        raise IncompleteSourceError(f"{file}: {SHARDING_KEY} metadata is not JSON ({e}); the file is corrupt") from e
    if not isinstance(info, dict):
        raise IncompleteSourceError(f"{file}: {SHARDING_KEY} metadata is not an object; the file is corrupt")
    return info


def _offsets(file: Path, name: str, info: dict[str, Any], rank: int) -> tuple[int, ...]:
    try:
        offs = tuple(int(o) for o in info[name][OFFSETS_KEY])
    except (KeyError, TypeError, ValueError):
        raise IncompleteSourceError(f"{file}: no {OFFSETS_KEY} for {name} in {SHARDING_KEY}; the file is corrupt") from None
    if len(offs) != rank:
        raise IncompleteSourceError(f"{file}: {name} has {rank} dims but {len(offs)} saved offsets; the file is corrupt")
    return offs


class HfDistributedSource:
    """Per-rank HF safetensors shards placed by their saved offsets."""

    format: ClassVar[str] = NAME

    def __init__(self, path: Path) -> None:
        self.path = path
        files = shard_files(path)
        if not files:
            raise BadInputError(f"{path}: no shard-NNNNN-model-NNNNN-of-NNNNN.safetensors files")
        ranks = sorted({r for r, _ in files})
        if ranks != list(range(1, len(ranks) + 1)):
            missing = sorted(set(range(1, ranks[-1] + 1)) - set(ranks))
            raise IncompleteSourceError(f"{path}: shard files of rank number(s) {missing} are missing (found {ranks}); "
                                        "copy every rank's shard-*.safetensors file")
        boxes: dict[str, list[Chunk]] = {}
        dtypes: dict[str, tuple[str, Path]] = {}
        for _, f in files:
            header = read_header(f)
            info = _sharding_info(f, header.metadata)
            for name, meta in header.tensors.items():  # every tensor, whatever its name (only __metadata__ is not one)
                offs = _offsets(f, name, info, len(meta.shape))
                if name in dtypes and dtypes[name][0] != meta.dtype:
                    raise IncompleteSourceError(f"{path}: {name} is {dtypes[name][0]} in {dtypes[name][1].name} but "
                                                f"{meta.dtype} in {f.name}; the shards come from different saves")
                dtypes.setdefault(name, (meta.dtype, f))
                boxes.setdefault(name, []).append(Chunk(offs, meta.shape, f.name, header.data_start + meta.start, meta.nbytes))
        entries: list[TensorEntry | ObjectEntry] = []
        for name, chunks in boxes.items():
            shape = tuple(max(c.offsets[d] + c.sizes[d] for c in chunks) for d in range(len(chunks[0].sizes)))
            check_tiling(name, shape, chunks)
            entries.append(TensorEntry(name, (name,), dtypes[name][0], shape, tuple(chunks)))
        paths = [f for _, f in files]
        note = (f"{len(ranks)} ranks' shards placed by their saved offsets; the format records no global shape, so a "
                "tensor's shape is where its last rank's rows end")
        self.index = SourceIndex(path, NAME, paths, sum(p.stat().st_size for p in paths), entries, [note])
        self._entries = {e.key: e for e in entries if isinstance(e, TensorEntry)}
        self._fds: dict[str, int] = {}

    def _fd(self, rel: str) -> int:
        fd = self._fds.get(rel)
        if fd is None:
            fd = self._fds[rel] = open_regular(self.path / rel)
        return fd

    def _entry(self, key: str) -> TensorEntry:
        try:
            return self._entries[key]
        except KeyError:
            raise BadInputError(f"{self.path}: no tensor {key!r} in the shards") from None

    def read_tensor(self, key: str) -> torch.Tensor:
        entry = self._entry(key)
        dtype = torch_dtype(entry.dtype)
        out = torch.empty(entry.shape, dtype=dtype)
        for c in entry.chunks:
            if not c.numel:
                continue
            view = out
            for dim, (o, s) in enumerate(zip(c.offsets, c.sizes, strict=True)):
                view = view.narrow(dim, o, s)
            part = view if view.is_contiguous() else torch.empty(c.sizes, dtype=dtype)
            dest = part.reshape(-1).view(torch.uint8).numpy().data
            if len(dest) != c.length:
                raise IncompleteSourceError(f"{self.path / (c.file or '')}: {key} holds {c.length} bytes, its box "
                                            f"{list(c.sizes)} needs {len(dest)}; the file is corrupt")
            fill(self._fd(c.file or ""), c.byte_offset, dest, self.path / (c.file or ""), key)
            if part is not view:
                view.copy_(part)
        return out

    def byte_ranges(self, key: str) -> list[ByteRange] | None:
        """The tensor's row-major bytes as file runs when every rank holds whole rows."""
        entry = self._entry(key)
        chunks = sorted((c for c in entry.chunks if c.numel), key=lambda c: c.offsets)
        if any(c.sizes[1:] != entry.shape[1:] for c in chunks):
            return None
        ranges = [ByteRange(self._fd(c.file or ""), c.byte_offset, c.length, self.path / (c.file or "")) for c in chunks]
        return ranges if sum(r.nbytes for r in ranges) == entry.nbytes else None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
