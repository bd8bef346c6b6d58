"""Find a tensor's bytes inside a DCP chunk record without decoding the record.

A DCP chunk record is a ``torch.save`` archive: an uncompressed zip whose ``data.pkl`` says
which storage holds the tensor and how (storage offset, size, stride), and whose
``data/<key>`` entry holds the storage's raw bytes. :func:`locate` reads the zip's central
directory (at the end of the record), the tiny ``data.pkl`` and two local headers -- a few
small ``pread`` calls -- and returns where the tensor's bytes lie in the file. Readers then
``preadv`` them straight into the destination memory (:func:`read_into`) or hand the byte
range to the streaming writer: no intermediate buffer, no ``torch.load``.

What :func:`~shardfix.io.zipdir.check_zip_record` checks on the decoding path holds here
too: the archive must end exactly where the record ends, every member must lie inside it,
stored, and the small members (``data.pkl``, ``byteorder``) must match their CRC-32 or the
record is declined. The storage member's CRC-32 (:attr:`RecordLayout.crc32`) is checked by
whoever reads its bytes, as they stream past: :func:`read_into` here, the writer for streamed
tensors (see :class:`~shardfix.sources.base.MemberCheck`).

``data.pkl`` is parsed with :class:`_LayoutUnpickler`, which is stricter than torch's
``weights_only`` unpickler: it resolves only ``torch._utils._rebuild_tensor_v2``/``_v3``,
``collections.OrderedDict``, the typed-storage classes, ``UntypedStorage`` and torch dtypes, and
its rebuild functions return a plain description rather than a tensor. It never calls anything
else.

Anything unusual -- a compressed or zstd-framed record, a storage type or rebuild function not
listed, tensor metadata, a byte order other than the host's, negative strides, offsets outside
the record -- makes :func:`locate` return ``None``; the caller then decodes the record with
``torch.load(weights_only=True)`` as before, which also produces the error message for a corrupt
record. The fast path therefore never decides that a record is bad; it only declines.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from shardfix.dtypes import ST_TO_TORCH, numel
from shardfix.io import zipdir
from shardfix.io.preads import fill_upto, pread_upto
from shardfix.io.zipdir import LOCAL_SIZE

#: Bytes read from the end of a record to find the end-of-central-directory records; a
#: torch.save record's directory (7 small entries, no comment) fits many times over.
_TAIL = 4096
#: Largest ``data.pkl`` or central directory accepted; a one-tensor record needs ~200 bytes.
_MAX_SMALL = 1 << 20
#: Most members accepted; a one-tensor record has 5-7.
_MAX_MEMBERS = 64
#: Bytes read past a local header's fixed part in one go: name plus torch's alignment padding.
_LOCAL_SLACK = 512

_SUPPORTED = frozenset(ST_TO_TORCH.values())
_TYPED_STORAGES: dict[str, torch.dtype] = {
    name: dt
    for name, dt in (
        ("DoubleStorage", torch.float64), ("FloatStorage", torch.float32), ("HalfStorage", torch.float16),
        ("BFloat16Storage", torch.bfloat16), ("LongStorage", torch.int64), ("IntStorage", torch.int32),
        ("ShortStorage", torch.int16), ("CharStorage", torch.int8), ("ByteStorage", torch.uint8),
        ("BoolStorage", torch.bool), ("ComplexFloatStorage", torch.complex64),
    )
    if dt in _SUPPORTED
}


class _Decline(Exception):
    """The record is not in the plain layout the fast path reads; use torch.load."""


@dataclass(frozen=True, slots=True)
class _StorageType:
    dtype: torch.dtype | None  # None: UntypedStorage (numel counts bytes; dtype comes from v3)


@dataclass(frozen=True, slots=True)
class _StorageRef:
    dtype: torch.dtype | None
    key: str
    numel: int


@dataclass(frozen=True, slots=True)
class _Rebuilt:
    storage: _StorageRef
    dtype: torch.dtype
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class RecordLayout:
    """Where one record's tensor lies in its file.

    Attributes:
        dtype, shape, stride: the tensor as ``torch.load`` would rebuild it.
        storage_offset: in elements, from the storage's first byte.
        storage_start: absolute file offset of the storage's first byte.
        storage_nbytes: bytes the storage holds.
        crc32: the CRC-32 the zip directory records for the storage member (0: none recorded).
        member: the storage member's name, for messages.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    storage_start: int
    storage_nbytes: int
    crc32: int = 0
    member: str = ""

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def contiguous_range(self) -> tuple[int, int] | None:
        """``(file offset, nbytes)`` when the tensor's row-major bytes are one run, else None."""
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size != 1 and stride != expected:
                return None
            expected *= size
        return self.storage_start + self.storage_offset * self.dtype.itemsize, self.nbytes


# -- data.pkl -----------------------------------------------------------------------------------


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
        raise _Decline(f"{what} is not a tuple of non-negative ints")
    return value


def _rebuild(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
             backward_hooks: Any, dtype: torch.dtype | None, metadata: Any) -> _Rebuilt:
    if not isinstance(storage, _StorageRef):
        raise _Decline("storage is not a persistent storage reference")
    if type(storage_offset) is not int or storage_offset < 0:
        raise _Decline("bad storage offset")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride) or type(requires_grad) is not bool:
        raise _Decline("size, stride or requires_grad malformed")
    if not isinstance(backward_hooks, collections.OrderedDict) or backward_hooks or metadata:
        raise _Decline("backward hooks or tensor metadata present")
    dtype = dtype if dtype is not None else storage.dtype
    if dtype is None or dtype not in _SUPPORTED or (storage.dtype is not None and storage.dtype != dtype):
        raise _Decline(f"dtype {dtype} not handled")
    return _Rebuilt(storage, dtype, storage_offset, size, stride)


def _rebuild_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                backward_hooks: Any, metadata: Any = None) -> _Rebuilt:
    return _rebuild(storage, storage_offset, size, stride, requires_grad, backward_hooks, None, metadata)


def _rebuild_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                backward_hooks: Any, dtype: Any, metadata: Any = None) -> _Rebuilt:
    if not isinstance(dtype, torch.dtype):
        raise _Decline("v3 dtype is not a torch dtype")
    return _rebuild(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata)


class _LayoutUnpickler(pickle.Unpickler):
    """Resolves only what a one-tensor ``torch.save`` pickle references; builds no tensor."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_v2
        if module == "torch._utils" and name == "_rebuild_tensor_v3":
            return _rebuild_v3
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name in _TYPED_STORAGES:
            return _StorageType(_TYPED_STORAGES[name])
        if (module, name) in (("torch", "UntypedStorage"), ("torch.storage", "UntypedStorage")):
            return _StorageType(None)
        if module == "torch":
            value = getattr(torch, name, None)
            if isinstance(value, torch.dtype):
                return value
        raise _Decline(f"global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if (
            isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[3], str)
            and type(pid[4]) is int and pid[4] >= 0
        ):
            return _StorageRef(pid[1].dtype, pid[2], pid[4])
        raise _Decline("persistent id is not a storage reference")


def parse_pickle(data: bytes) -> _Rebuilt:
    """Parse a record's ``data.pkl``; raise :class:`_Decline` unless it is one plain tensor."""
    try:
        value = _LayoutUnpickler(io.BytesIO(data)).load()
    except _Decline:
        raise
    except Exception as e:  # any malformed pickle: let torch.load judge it
        raise _Decline(f"data.pkl: {type(e).__name__}") from e
    if not isinstance(value, _Rebuilt):
        raise _Decline("data.pkl does not hold exactly one tensor")
    return value


# -- zip ----------------------------------------------------------------------------------------


def _entry_data(fd: int, base: int, end: int, member: zipdir.Member, read: bool) -> tuple[int, bytes]:
    """Offset of a member's data (relative to ``base``) and, when ``read``, its CRC-checked bytes.

    ``end`` is where the archive's member data ends (its central directory starts).
    """
    want = LOCAL_SIZE + _LOCAL_SLACK + (member.size if read else 0)
    head = pread_upto(fd, base + member.header_offset, min(want, max(end - member.header_offset, 0)))
    start = zipdir.data_offset(head, member, end)
    if not read:
        return start, b""
    rel = start - member.header_offset
    body = head[rel : rel + member.size]
    if len(body) != member.size:
        body = pread_upto(fd, base + start, member.size)
        if len(body) != member.size:
            raise _Decline("short read")
    if not zipdir.crc_matches(body, member):
        raise _Decline(f"{member.name} fails its CRC-32 check")  # the decoding path names the damage
    return start, body


def locate(fd: int, base: int, length: int) -> RecordLayout | None:
    """Where the tensor of the ``torch.save`` record at ``base`` (``length`` bytes) lies, or None.

    None means "not the plain layout": decode the record with ``torch.load`` instead.
    """
    try:
        return _locate(fd, base, length)
    except (_Decline, zipdir.ZipError, OSError, struct.error, UnicodeError):
        return None


def _locate(fd: int, base: int, length: int) -> RecordLayout:
    if length < 22:
        raise _Decline("record too short to be a zip")
    directory = zipdir.read_directory(lambda offset, n: pread_upto(fd, base + offset, n), length, tail=_TAIL,
                                      max_members=_MAX_MEMBERS, max_directory=_MAX_SMALL)
    entries, end = directory
    prefixes = {name.split("/", 1)[0] for name in entries}
    if len(prefixes) != 1:
        raise _Decline("entries do not share one archive prefix")
    prefix = prefixes.pop()
    pkl = entries.get(f"{prefix}/data.pkl")
    if pkl is None or pkl.size > _MAX_SMALL:
        raise _Decline("no (small) data.pkl")
    order = entries.get(f"{prefix}/byteorder")
    if order is not None:
        if order.size > 16:
            raise _Decline("odd byteorder record")
        _, text = _entry_data(fd, base, end, order, read=True)
        if text.decode("ascii", "replace") != sys.byteorder:
            raise _Decline("byte order differs from the host's")
    _, pickled = _entry_data(fd, base, end, pkl, read=True)
    rebuilt = parse_pickle(pickled)
    data_name = f"{prefix}/data/{rebuilt.storage.key}"
    data = entries.get(data_name)
    if data is None:
        raise _Decline(f"no {data_name}")
    start, nbytes = _entry_data(fd, base, end, data, read=False)[0], data.size
    itemsize = rebuilt.dtype.itemsize
    expected = rebuilt.storage.numel * (itemsize if rebuilt.storage.dtype is not None else 1)
    if nbytes != expected:
        raise _Decline("storage entry size differs from the pickle's storage size")
    if any(s == 0 for s in rebuilt.size):
        last = -1
    else:
        last = rebuilt.storage_offset + sum((s - 1) * st for s, st in zip(rebuilt.size, rebuilt.stride, strict=True))
    if (last + 1) * itemsize > nbytes:
        raise _Decline("tensor addresses bytes outside its storage")
    return RecordLayout(rebuilt.dtype, rebuilt.size, rebuilt.stride, rebuilt.storage_offset, base + start, nbytes,
                        data.crc32, data_name)


# -- reading ------------------------------------------------------------------------------------


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory."""
    if t.numel() == 0:
        return memoryview(bytearray())
    return t.reshape(-1).view(torch.uint8).numpy().data.cast("B")


def read_into(fd: int, layout: RecordLayout, dest: torch.Tensor) -> bool:
    """Fill ``dest`` (same dtype and shape as the record) with the record's tensor.

    A contiguous record is read with one ``preadv`` straight into ``dest`` when ``dest`` is
    contiguous; otherwise the storage is read once and copied with the record's strides. The
    storage's CRC-32 is checked on the bytes read. Returns False (``dest`` possibly partly
    written) when the file ends early, the CRC does not match, or checking it would need bytes
    the tensor does not use: the caller then decodes the record, which names the problem.
    """
    if dest.dtype != layout.dtype or tuple(dest.shape) != layout.shape:
        return False
    if layout.numel == 0:
        return True
    run = layout.contiguous_range()
    whole = run is not None and run == (layout.storage_start, layout.storage_nbytes)
    try:
        if run is not None and dest.is_contiguous() and (whole or not layout.crc32):
            view = byte_view(dest)
            if fill_upto(fd, run[0], view) != len(view):
                return False  # the file ends early: the fallback reports the truncation properly
            return not layout.crc32 or zlib.crc32(view) == layout.crc32
        itemsize = layout.dtype.itemsize
        if layout.crc32:  # the check covers the whole member: read all of it
            first, nbytes = 0, layout.storage_nbytes
        else:
            first = layout.storage_offset
            last = first + sum((s - 1) * st for s, st in zip(layout.shape, layout.stride, strict=True))
            nbytes = (last - first + 1) * itemsize
        span = torch.empty(nbytes, dtype=torch.uint8)
        view = byte_view(span)
        if fill_upto(fd, layout.storage_start + first * itemsize, view) != len(view):
            return False
        if layout.crc32 and zlib.crc32(view) != layout.crc32:
            return False
        offset = layout.storage_offset - first
        dest.copy_(torch.as_strided(span[: nbytes - nbytes % itemsize].view(layout.dtype), layout.shape,
                                    layout.stride, offset))
        return True
    except OSError:
        return False


def read_tensor(fd: int, base: int, length: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The record's tensor, or None when it is not plain or not ``dtype``/``shape``."""
    layout = locate(fd, base, length)
    if layout is None or layout.dtype != dtype or layout.shape != shape:
        return None
    out = torch.empty(shape, dtype=dtype)
    return out if read_into(fd, layout, out) else None
