"""Find a tensor's bytes inside a DCP chunk record without decoding the record.

A DCP chunk record is a ``torch.save`` archive: an uncompressed zip whose ``data.pkl`` says
which storage holds the tensor and how (storage offset, size, stride), and whose
``data/<key>`` entry holds the storage's raw bytes. :func:`locate` reads the zip's central
directory (at the end of the record), the tiny ``data.pkl`` and two local headers -- a few
small ``pread`` calls -- and returns where the tensor's bytes lie in the file. Readers then
``preadv`` them straight into the destination memory (:func:`read_into`) or hand the byte
range to the streaming writer: no intermediate buffer, no ``torch.load``.

What :func:`~shardfix.sources.zipcheck.check_zip_record` checks on the decoding path holds here
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
import os
import pickle
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from shardfix.dtypes import ST_TO_TORCH

_EOCD = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_EOCD = b"PK\x06\x06"
_CENTRAL = b"PK\x01\x02"
_LOCAL = b"PK\x03\x04"
_U32_MAX = 0xFFFFFFFF
_U16_MAX = 0xFFFF

#: Bytes read from the end of a record to find the end-of-central-directory records; a
#: torch.save record's directory (7 small entries, no comment) fits many times over.
_TAIL = 4096
#: Largest ``data.pkl`` or central directory accepted; a one-tensor record needs ~200 bytes.
_MAX_SMALL = 1 << 20
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
        n = 1
        for s in self.shape:
            n *= s
        return n

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


def _pread(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise _Decline("short read")
    return data


def _zip64_values(extra: bytes, wanted: list[bool]) -> list[int]:
    """Values of the zip64 extra field (id 1) for the 32-bit fields that overflowed."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            body = extra[pos + 4 : pos + 4 + size]
            count = sum(wanted)
            if len(body) < 8 * count:
                raise _Decline("zip64 extra field too short")
            return list(struct.unpack_from(f"<{count}Q", body))
        pos += 4 + size
    raise _Decline("zip64 extra field missing")


def _central_directory(fd: int, base: int, length: int) -> tuple[dict[str, tuple[int, int, int, int]], int]:
    """``{name: (method, size, local header offset, crc32)}`` of the zip stored at ``base``, and
    where its member data ends (the directory's offset)."""
    n = min(length, _TAIL)
    tail = _pread(fd, n, base + length - n)
    pos = tail.rfind(_EOCD)
    if pos < 0 or pos + 22 > len(tail):
        raise _Decline("no end of central directory")
    _, _, _, count, cd_size, cd_off, comment = struct.unpack_from("<HHHHIIH", tail, pos + 4)
    if pos + 22 + comment != len(tail):
        raise _Decline("end of central directory not at the end of the record")
    loc = pos - 20
    if loc >= 0 and tail[loc : loc + 4] == _ZIP64_LOCATOR:
        (z64_off,) = struct.unpack_from("<Q", tail, loc + 8)
        rel = z64_off - (length - n)  # the zip64 record's position inside ``tail``
        if rel < 0 or rel + 56 > loc or tail[rel : rel + 4] != _ZIP64_EOCD:
            raise _Decline("zip64 end of central directory not where its locator says")
        count, cd_size, cd_off = struct.unpack_from("<QQQ", tail, rel + 32)
        cd_end = z64_off
    elif _U16_MAX in (count,) or _U32_MAX in (cd_size, cd_off):
        raise _Decline("zip64 sizes without a zip64 locator")
    else:
        cd_end = length - n + pos
    if cd_off + cd_size != cd_end or cd_size > _MAX_SMALL or count > 64:
        raise _Decline("central directory not contiguous with its end record (prepended data?)")
    rel = cd_off - (length - n)
    cd = tail[rel : rel + cd_size] if rel >= 0 else _pread(fd, cd_size, base + cd_off)
    entries: dict[str, tuple[int, int, int, int]] = {}
    pos = 0
    for _ in range(count):
        if cd[pos : pos + 4] != _CENTRAL or pos + 46 > len(cd):
            raise _Decline("bad central directory entry")
        method, crc, csize, usize, nlen, xlen, clen = struct.unpack_from("<H4xIIIHHH", cd, pos + 10)
        (lho,) = struct.unpack_from("<I", cd, pos + 42)
        name = cd[pos + 46 : pos + 46 + nlen].decode("utf-8", "replace")
        extra = cd[pos + 46 + nlen : pos + 46 + nlen + xlen]
        wanted = [usize == _U32_MAX, csize == _U32_MAX, lho == _U32_MAX]
        if any(wanted):
            values = iter(_zip64_values(extra, wanted))
            usize = next(values) if wanted[0] else usize
            csize = next(values) if wanted[1] else csize
            lho = next(values) if wanted[2] else lho
        if csize != usize or lho + 30 > cd_off:
            raise _Decline(f"{name} is compressed or outside the archive data")
        entries[name] = (method, usize, lho, crc)
        pos += 46 + nlen + xlen + clen
    if pos != cd_size:
        raise _Decline("central directory size does not match its entries")
    return entries, cd_off


def _entry_data(fd: int, base: int, end: int, name: str, entry: tuple[int, int, int, int],
                read: bool) -> tuple[int, bytes]:
    """Offset of an entry's data (relative to ``base``) and, when ``read``, its CRC-checked bytes.

    ``end`` is where the archive's member data ends (its central directory starts).
    """
    method, size, lho, crc = entry
    if method != 0:
        raise _Decline(f"{name} is compressed")
    want = 30 + _LOCAL_SLACK + (size if read else 0)
    head = os.pread(fd, min(want, max(end - lho, 0)), base + lho)
    if len(head) < 30 or head[:4] != _LOCAL:
        raise _Decline(f"no local header for {name}")
    nlen, xlen = struct.unpack_from("<HH", head, 26)
    if head[30 : 30 + nlen].decode("utf-8", "replace") != name:
        raise _Decline(f"local header name differs for {name}")
    start = lho + 30 + nlen + xlen
    if start + size > end:
        raise _Decline(f"{name} runs past the end of the archive data")
    if not read:
        return start, b""
    body = head[start - lho : start - lho + size]
    if len(body) != size:
        body = _pread(fd, size, base + start)
    if crc and zlib.crc32(body) != crc:
        raise _Decline(f"{name} fails its CRC-32 check")  # the decoding path names the damage
    return start, body


def locate(fd: int, base: int, length: int) -> RecordLayout | None:
    """Where the tensor of the ``torch.save`` record at ``base`` (``length`` bytes) lies, or None.

    None means "not the plain layout": decode the record with ``torch.load`` instead.
    """
    try:
        return _locate(fd, base, length)
    except (_Decline, OSError, struct.error, UnicodeError):
        return None


def _locate(fd: int, base: int, length: int) -> RecordLayout:
    if length < 22:
        raise _Decline("record too short to be a zip")
    entries, end = _central_directory(fd, base, length)
    prefixes = {name.split("/", 1)[0] for name in entries}
    if len(prefixes) != 1:
        raise _Decline("entries do not share one archive prefix")
    prefix = prefixes.pop()
    pkl = entries.get(f"{prefix}/data.pkl")
    if pkl is None or pkl[1] > _MAX_SMALL:
        raise _Decline("no (small) data.pkl")
    order = entries.get(f"{prefix}/byteorder")
    if order is not None:
        if order[1] > 16:
            raise _Decline("odd byteorder record")
        _, text = _entry_data(fd, base, end, f"{prefix}/byteorder", order, read=True)
        if text.decode("ascii", "replace") != sys.byteorder:
            raise _Decline("byte order differs from the host's")
    _, pickled = _entry_data(fd, base, end, f"{prefix}/data.pkl", pkl, read=True)
    rebuilt = parse_pickle(pickled)
    data_name = f"{prefix}/data/{rebuilt.storage.key}"
    data = entries.get(data_name)
    if data is None:
        raise _Decline(f"no {data_name}")
    start, nbytes = _entry_data(fd, base, end, data_name, data, read=False)[0], data[1]
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
                        data[3], data_name)


# -- reading ------------------------------------------------------------------------------------

#: Linux returns at most about 2 GiB from one read; ask for less and loop.
_MAX_READ = 1 << 30


def _fill(fd: int, offset: int, dest: memoryview) -> None:
    done, length = 0, len(dest)
    while done < length:
        n = os.preadv(fd, [dest[done : done + min(_MAX_READ, length - done)]], offset + done)
        if n == 0:
            raise _Decline("file ended early")  # the fallback reports the truncation properly
        done += n


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory."""
    if t.numel() == 0:
        return memoryview(bytearray())
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


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
            _fill(fd, run[0], view)
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
        _fill(fd, layout.storage_start + first * itemsize, view)
        if layout.crc32 and zlib.crc32(view) != layout.crc32:
            return False
        offset = layout.storage_offset - first
        dest.copy_(torch.as_strided(span[: nbytes - nbytes % itemsize].view(layout.dtype), layout.shape,
                                    layout.stride, offset))
        return True
    except (_Decline, OSError):
        return False


def read_tensor(fd: int, base: int, length: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The record's tensor, or None when it is not plain or not ``dtype``/``shape``."""
    layout = locate(fd, base, length)
    if layout is None or layout.dtype != dtype or layout.shape != shape:
        return None
    out = torch.empty(shape, dtype=dtype)
    return out if read_into(fd, layout, out) else None
