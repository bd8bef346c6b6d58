"""PyTorch Distributed Checkpoint (DCP) directories: ``.metadata`` plus ``__{rank}_{i}.distcp``.

The index comes from the metadata pickle, loaded with the allowlist unpickler in
:mod:`shardfix.io.safe_pickle` (never ``pickle.load``). A ``use_collectives=False`` save has one
``__{rank}.metadata`` per rank instead; those are merged. Every tensor's chunk boxes must tile
its global shape exactly and every record must lie inside its file -- checked when the index
is built, before any tensor byte is read.

Each chunk record is a complete ``torch.save`` zip archive (or a zstd frame holding one, or,
for ``serialization_format=SAFETENSORS`` saves, a tensor inside a safetensors file). Records
are read by byte range. A plain record (the usual case) is not decoded at all:
:mod:`shardfix.sources.fastrecord` finds its tensor's bytes, which are read straight into the
destination (or streamed to the output, see :meth:`DcpSource.byte_ranges`); anything else is
decoded with ``weights_only=True``.
"""

from __future__ import annotations

import io
import os
import re
import threading
from pathlib import Path
from typing import Any, ClassVar

import torch

from shardfix.dtypes import itemsize, numel, st_name, torch_dtype
from shardfix.errors import BadInputError, IncompleteSourceError, ShardfixError
from shardfix.io import st_header
from shardfix.io.preads import fill, pread_upto, read_exact
from shardfix.io.regular import open_regular
from shardfix.io.safe_pickle import is_weights_only_refusal, load_metadata_pickle, refused_global
from shardfix.io.zipdir import check_zip_record
from shardfix.sources import fastrecord
from shardfix.sources.base import ByteRange, Chunk, MemberCheck, ObjectEntry, SourceIndex, TensorEntry
from shardfix.sources.dcp_bounds import check_chunk_count
from shardfix.sources.records import decode_record, is_zstd, record_limit
from shardfix.sources.tiling import check_tiling

NAME = "dcp"
DESCRIBE = "a DCP directory with .metadata and .distcp files"

_RANK_METADATA = re.compile(r"^__(\d+)\.metadata$")


def _metadata_files(path: Path) -> list[Path]:
    if (path / ".metadata").is_file():
        return [path / ".metadata"]
    ranks = sorted(
        (int(m.group(1)), p) for p in path.iterdir() if (m := _RANK_METADATA.match(p.name))
    )
    return [p for _, p in ranks]


def detect(path: Path) -> bool:
    """A directory with DCP metadata or ``.distcp`` files."""
    if not path.is_dir():
        return False
    if (path / ".metadata").is_file():
        return True
    try:
        return any(p.suffix == ".distcp" or _RANK_METADATA.match(p.name) for p in path.iterdir())
    except OSError:
        return False


def open(path: Path, trust_pickle: bool = False) -> DcpSource:  # noqa: A001 - registry verb
    return DcpSource(path, trust_pickle=trust_pickle)


class DcpSource:
    """A DCP checkpoint directory."""

    format: ClassVar[str] = NAME

    def __init__(self, path: Path, trust_pickle: bool = False) -> None:
        self.path = path
        self.trust_pickle = trust_pickle
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._pickled: list[str] = []  # bytes entries that need full unpickling
        md_files = _metadata_files(path)
        if not md_files:
            raise IncompleteSourceError(
                f"{path}: has .distcp files but no .metadata (nor __N.metadata); the save did not "
                "finish or the metadata was not copied -- copy the whole checkpoint directory"
            )
        metas = [load_metadata_pickle(p) for p in md_files]
        check_chunk_count(md_files, metas)
        where = md_files[0] if len(md_files) == 1 else path
        try:
            self.index = self._build_index(md_files, metas)
        except ShardfixError:
            raise
        except Exception as e:  # a pickle that loads but does not hold what genuine metadata holds
            raise BadInputError(
                f"{where}: malformed DCP metadata ({type(e).__name__}: {str(e)[:200]}); the file is corrupt "
                "or was not written by torch.distributed.checkpoint -- copy the checkpoint again"
            ) from e
        self.index.notes.extend(self._pickle_notes())

    # -- index -------------------------------------------------------------------------

    def _build_index(self, md_files: list[Path], metas: list[Any]) -> SourceIndex:
        sd_meta: dict[str, Any] = {}
        planner: dict[str, Any] = {}
        storage: dict[tuple[str, tuple[int, ...] | None], Any] = {}
        chunk_lists: dict[str, list[Any]] = {}
        from torch.distributed.checkpoint.metadata import Metadata

        for md_path, md in zip(md_files, metas, strict=True):
            if not isinstance(md, Metadata):
                raise BadInputError(f"{md_path}: holds a {type(md).__name__}, not DCP Metadata")
            try:
                items = md.state_dict_metadata.items()
                storage_items = (md.storage_data or {}).items()
                planner.update(md.planner_data or {})
            except AttributeError as e:
                raise BadInputError(f"{md_path}: not DCP metadata ({e})") from e
            for key, meta in items:
                if key in sd_meta and hasattr(meta, "chunks"):
                    # per-rank saves list replicated tensors (buffers, step) once per rank: the
                    # same box twice is a replica, not an overlap
                    known = {(tuple(c.offsets), tuple(c.sizes)) for c in chunk_lists[key]}
                    chunk_lists[key].extend(c for c in meta.chunks if (tuple(c.offsets), tuple(c.sizes)) not in known)
                else:
                    sd_meta[key] = meta
                    if hasattr(meta, "chunks"):
                        chunk_lists[key] = list(meta.chunks)
            for mi, info in storage_items:
                off = tuple(mi.offset) if mi.offset is not None else None
                storage[(mi.fqn, off)] = info

        files: dict[str, int] = {}
        for p in sorted(self.path.iterdir()):
            if p.suffix == ".distcp":
                files[p.name] = p.stat().st_size

        entries: list[TensorEntry | ObjectEntry] = []
        for key, meta in sd_meta.items():
            path = tuple(planner.get(key, (key,)))
            if hasattr(meta, "chunks"):
                shape = tuple(int(d) for d in meta.size)
                dtype = st_name(meta.properties.dtype)
                chunks = []
                for c in chunk_lists[key]:
                    offs = tuple(int(o) for o in c.offsets)
                    sizes = tuple(int(s) for s in c.sizes)
                    info = storage.get((key, offs))
                    if info is None:
                        if numel(sizes) == 0:
                            chunks.append(Chunk(offs, sizes))
                            continue
                        raise IncompleteSourceError(
                            f"{self.path}: no storage record for {key} chunk at {list(offs)}; "
                            "the metadata is incomplete"
                        )
                    chunks.append(self._chunk(key, offs, sizes, info, files))
                check_tiling(key, shape, chunks)
                self._check_record_sizes(key, dtype, shape, chunks)
                entries.append(TensorEntry(key, path, dtype, shape, tuple(chunks)))
            else:
                info = storage.get((key, None))
                if info is None:
                    raise IncompleteSourceError(f"{self.path}: no storage record for bytes entry {key}")
                entries.append(self._object_entry(key, path, self._chunk(key, (), (), info, files)))
        total = sum(files.values()) + sum(p.stat().st_size for p in md_files)
        return SourceIndex(
            path=self.path,
            format=NAME,
            files=[*md_files, *(self.path / f for f in files)],
            total_bytes=total,
            entries=entries,
            notes=[f"merged {len(md_files)} per-rank metadata files"] if len(md_files) > 1 else [],
        )

    def _chunk(
        self, key: str, offs: tuple[int, ...], sizes: tuple[int, ...], info: Any, files: dict[str, int]
    ) -> Chunk:
        rel = str(info.relative_path)
        if rel not in files:
            raise IncompleteSourceError(
                f"{self.path / rel}: missing (needed for {key}); copy every .distcp file of the "
                "checkpoint -- each rank wrote its own"
            )
        start, length = int(info.offset), int(info.length)
        if start < 0 or length < 0 or start + length > files[rel]:
            raise IncompleteSourceError(
                f"{self.path / rel}: record for {key} spans bytes {start}..{start + length} but the "
                f"file has {files[rel]} bytes; the file is truncated -- copy it again"
            )
        transforms = tuple(getattr(info, "transform_descriptors", None) or ())
        return Chunk(offs, sizes, rel, start, length, transforms)

    def _object_entry(self, key: str, path: tuple, chunk: Chunk) -> ObjectEntry:
        raw = self._read(chunk, key)
        origin = self.path / (chunk.file or "")
        check_zip_record(raw, origin, key)
        try:
            value = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
        except Exception as e:  # weights_only refuses arbitrary objects
            if not is_weights_only_refusal(e):
                raise BadInputError(f"{origin}: cannot decode bytes entry {key}: {str(e)[:300]}") from e
            what = refused_global(e)
            self._pickled.append(f"{key} ({what})")
            if not self.trust_pickle:
                return ObjectEntry(key, path, None, f"unreadable: needs full unpickling of {what} (refused; "
                                   "--trust-pickle reads it if you trust the checkpoint)")
            try:
                value = torch.load(io.BytesIO(raw), weights_only=False, map_location="cpu")
            except Exception as e2:
                raise BadInputError(f"{origin}: cannot decode bytes entry {key} even with --trust-pickle: "
                                    f"{type(e2).__name__}: {str(e2)[:200]}") from e2
        return ObjectEntry(key, path, value, type(value).__name__)

    def _pickle_notes(self) -> list[str]:
        if not self._pickled:
            return []
        keys = ", ".join(self._pickled[:5]) + (f" and {len(self._pickled) - 5} more" if len(self._pickled) > 5 else "")
        if self.trust_pickle:
            return [f"--trust-pickle: bytes entries read with full unpickling (weights_only=False), which runs code "
                    f"stored in the checkpoint: {keys}"]
        return [f"bytes entries that only full unpickling can read were refused and not loaded (it would run code "
                f"stored in the checkpoint): {keys}; rerun with --trust-pickle only if you trust this checkpoint"]

    def _check_record_sizes(self, key: str, dtype: str, shape: tuple[int, ...], chunks: list[Chunk]) -> None:
        """Decode now any record smaller than its box, so a size or dtype mismatch fails before writing.

        An uncompressed record holds at least its box's bytes unless the tensor was saved as an
        expanded (stride-0) view; decoding the (small) record tells the two apart exactly.
        """
        for c in chunks:
            if c.file is None or c.transforms or not c.numel or c.length >= c.numel * itemsize(dtype):
                continue
            if self._safetensors_header(c.file) is not None or is_zstd(pread_upto(self._fd(c.file), c.byte_offset, 4), ()):
                continue  # checked when read (a compressed record is never expanded to learn its size)
            origin = self.path / c.file
            t = decode_record(self._read(c, key), (), origin, key)  # as stored: a stride-0 record stays small
            if t.dtype != torch_dtype(dtype) or tuple(t.shape) != c.sizes:
                raise IncompleteSourceError(
                    f"{origin}: record for {key} at {list(c.offsets)} holds {t.dtype} {list(t.shape)} but the metadata "
                    f"says {torch_dtype(dtype)} {list(c.sizes)}; the checkpoint is corrupt or its files come from "
                    "different saves")

    # -- reading ----------------------------------------------------------------------

    def _fd(self, rel: str) -> int:
        with self._lock:
            fd = self._fds.get(rel)
            if fd is None:
                fd = self._fds[rel] = open_regular(self.path / rel)
            return fd

    def _read(self, chunk: Chunk, key: str) -> bytearray:
        assert chunk.file is not None
        return read_exact(self._fd(chunk.file), chunk.byte_offset, chunk.length, self.path / chunk.file, key)

    def read_chunk(self, entry: TensorEntry, chunk: Chunk) -> torch.Tensor:
        """Decode one chunk record and check it matches the metadata's dtype and box."""
        dtype = torch_dtype(entry.dtype)
        if chunk.numel == 0:
            return torch.empty(chunk.sizes, dtype=dtype)
        origin = self.path / (chunk.file or "")
        header = self._safetensors_header(chunk.file or "")
        if header is not None:
            t = self._read_safetensors_chunk(entry, chunk, header)
        else:
            t = None
            if not chunk.transforms:
                t = fastrecord.read_tensor(self._fd(chunk.file or ""), chunk.byte_offset, chunk.length, dtype, chunk.sizes)
            if t is None:
                raw = self._read(chunk, entry.key)
                t = decode_record(raw, chunk.transforms, origin, entry.key, record_limit(chunk.numel * dtype.itemsize))
        assert t is not None  # every branch above reads the chunk or raises
        if t.dtype != dtype or tuple(t.shape) != chunk.sizes:
            raise IncompleteSourceError(
                f"{origin}: record for {entry.key} at {list(chunk.offsets)} holds "
                f"{t.dtype} {list(t.shape)} but the metadata says {dtype} {list(chunk.sizes)}; "
                "the checkpoint is corrupt or its files come from different saves"
            )
        return t

    def _safetensors_header(self, rel: str) -> st_header.Header | None:
        """The validated header when ``rel`` was saved with ``serialization_format=SAFETENSORS``."""
        cache = self.__dict__.setdefault("_st_headers", {})
        if rel not in cache:
            fd = self._fd(rel)
            cache[rel] = st_header.read_header_fd(fd, self.path / rel) if st_header.looks_like(pread_upto(fd, 0, 9)) else None
        return cache[rel]

    def _read_safetensors_chunk(self, entry: TensorEntry, chunk: Chunk, header: st_header.Header) -> torch.Tensor:
        origin = self.path / (chunk.file or "")
        info = header.tensors.get(entry.key)
        if info is None:
            raise IncompleteSourceError(f"{origin}: holds no tensor {entry.key}; the metadata belongs to another save")
        if info.dtype != entry.dtype or info.shape != chunk.sizes:
            raise IncompleteSourceError(
                f"{origin}: {entry.key} is {info.dtype} {list(info.shape)} but the metadata says "
                f"{entry.dtype} {list(chunk.sizes)}"
            )
        out = torch.empty(chunk.sizes, dtype=torch_dtype(entry.dtype))
        dest = out.reshape(-1).view(torch.uint8).numpy().data
        fill(self._fd(chunk.file or ""), header.data_start + info.start, dest, origin, entry.key)
        return out

    def read_tensor(self, key: str) -> torch.Tensor:
        entry = self._entry(key)
        dtype = torch_dtype(entry.dtype)
        if len(entry.chunks) == 1 and entry.chunks[0].sizes == entry.shape:
            return self.read_chunk(entry, entry.chunks[0])
        out = torch.empty(entry.shape, dtype=dtype)
        for chunk in entry.chunks:
            if chunk.numel == 0:
                continue
            view = out
            for dim, (o, s) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
                view = view.narrow(dim, o, s)
            layout = self._layout(chunk)
            if layout is not None and layout.dtype == dtype and fastrecord.read_into(self._fd(chunk.file or ""), layout, view):
                continue  # read straight into ``out``
            view.copy_(self.read_chunk(entry, chunk))
        return out

    def _layout(self, chunk: Chunk) -> fastrecord.RecordLayout | None:
        """Where a plain torch.save record's tensor lies, or None (decode it instead)."""
        if chunk.transforms or chunk.file is None or self._safetensors_header(chunk.file) is not None:
            return None
        return fastrecord.locate(self._fd(chunk.file), chunk.byte_offset, chunk.length)

    def byte_ranges(self, key: str) -> list[ByteRange] | None:
        """The tensor's row-major bytes as file runs, when every chunk is a plain record of whole rows."""
        entry = self._entry(key)
        dtype = torch_dtype(entry.dtype)
        ranges = []
        for chunk in sorted((c for c in entry.chunks if c.numel), key=lambda c: c.offsets):
            if chunk.sizes[1:] != entry.shape[1:]:
                return None  # not whole rows (e.g. sharded on dim 1): assemble instead
            rel = chunk.file or ""
            header = self._safetensors_header(rel)
            if header is not None:
                info = header.tensors.get(entry.key)
                if info is None or info.dtype != entry.dtype or info.shape != chunk.sizes:
                    return None  # read_chunk reports the mismatch
                ranges.append(ByteRange(self._fd(rel), header.data_start + info.start, info.nbytes, self.path / rel))
                continue
            layout = self._layout(chunk)
            run = layout.contiguous_range() if layout is not None else None
            if layout is None or run is None or layout.dtype != dtype or layout.shape != chunk.sizes:
                return None
            check = None
            if layout.crc32:  # the reader checks the storage member's CRC-32 as it streams it
                check = MemberCheck(layout.storage_start, layout.storage_nbytes, layout.crc32, key, layout.member)
            ranges.append(ByteRange(self._fd(rel), run[0], run[1], self.path / rel, check))
        if sum(r.nbytes for r in ranges) != entry.nbytes:
            return None
        return ranges

    def _entry(self, key: str) -> TensorEntry:
        if not hasattr(self, "_by_key"):
            self._by_key = {e.key: e for e in self.index.tensors()}
        try:
            return self._by_key[key]
        except KeyError:
            raise BadInputError(f"{self.path}: no tensor {key!r} in the checkpoint") from None

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

