"""The source model: a metadata-only index of a checkpoint and a way to read one tensor.

Every input format is a :class:`Source`. Opening a source builds its *index* -- keys, dtypes,
shapes, chunk boxes and byte ranges -- without reading tensor data; ``read_tensor`` then
materialises exactly one tensor. Executors reopen the source by path inside each task, so a
source must be cheap to open and hold no large state.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol

import torch

from shardfix.dtypes import itemsize, numel

PathPart = str | int


@dataclass(frozen=True, slots=True)
class Chunk:
    """One stored box of a tensor: where it sits in the tensor and where its bytes are."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str | None = None
    byte_offset: int = 0
    length: int = 0
    transforms: tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        return numel(self.sizes)


class MemberCheck(NamedTuple):
    """A CRC-32 over the ``nbytes`` bytes at ``start`` of a file: a zip member holding a range.

    A reader of the range also reads what the range leaves out of the member and compares.
    """

    start: int
    nbytes: int
    crc32: int
    key: str  # the checkpoint key, for messages
    member: str  # the member's name in the record, for messages


class ByteRange(NamedTuple):
    """``nbytes`` bytes at ``offset`` of the open file ``fd`` (``origin`` names it in errors)."""

    fd: int
    offset: int
    nbytes: int
    origin: Path
    check: MemberCheck | None = None


@dataclass(slots=True)
class TensorEntry:
    """A tensor in the source index (no data)."""

    key: str
    path: tuple[PathPart, ...]
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...] = ()
    stride: tuple[int, ...] | None = None
    #: "strided", or "sparse_coo" for sparse tensors (read back densified)
    layout: str = "strided"

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * itemsize(self.dtype)


@dataclass(slots=True)
class ObjectEntry:
    """A non-tensor entry (a number, a string, a list of names) with its loaded value."""

    key: str
    path: tuple[PathPart, ...]
    value: Any = None
    type_name: str = ""


Entry = TensorEntry | ObjectEntry


@dataclass(slots=True)
class StoredEntry:
    """A physical tensor of a format whose index holds *assembled* tensors (DeepSpeed's flat partitions).

    The index's entries are then logical tensors built from pieces of several stored ones; each
    stored tensor names the logical keys it ``feeds``, how many of its elements are padding, and
    (when it feeds nothing) why. The planner gives each one its own ledger entry.
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    feeds: list[str] = field(default_factory=list)
    padding: int = 0
    note: str = ""


@dataclass(slots=True)
class SourceIndex:
    """What a source holds, decided from metadata alone."""

    path: Path
    format: str
    files: list[Path]
    total_bytes: int
    entries: list[Entry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: things the reader found that a user would miss (state it cannot convert); they become plan warnings
    warnings: list[str] = field(default_factory=list)
    #: physical tensors that logical entries are assembled from (empty for most formats)
    stored: list[StoredEntry] = field(default_factory=list)
    #: files of the checkpoint directory that are not converted: ``{"file", "reason"}`` each
    not_converted: list[dict[str, str]] = field(default_factory=list)

    def tensors(self) -> Iterable[TensorEntry]:
        return (e for e in self.entries if isinstance(e, TensorEntry))

    def objects(self) -> Iterable[ObjectEntry]:
        return (e for e in self.entries if isinstance(e, ObjectEntry))

    def by_key(self) -> dict[str, Entry]:
        return {e.key: e for e in self.entries}


class Source(Protocol):
    """An opened checkpoint."""

    format: ClassVar[str]
    index: SourceIndex

    def read_tensor(self, key: str) -> torch.Tensor:
        """Return the full tensor stored under ``key`` (CPU, original dtype and shape)."""
        ...

    def close(self) -> None: ...

    # Optional: ``byte_ranges(key) -> list[ByteRange] | None`` -- the tensor's row-major bytes as
    # runs of its files, in order, or None when they are not stored that plainly. Executors
    # stream such tensors from the source file into the output file without assembling them.


def join_key(path: tuple[PathPart, ...]) -> str:
    """Flatten a nested path to the dotted key shardfix shows and the ledger records."""
    return ".".join(str(p) for p in path)
