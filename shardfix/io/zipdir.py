"""Zip archives as ``torch.save`` writes them: central directory (zip64 included), local headers, CRC-32.

A ``torch.save`` archive is an uncompressed zip. Its end-of-central-directory record (22 bytes
plus a comment) ends the archive; torch also writes the zip64 end record and its locator, which
then give the authoritative entry count, directory size and directory offset. The central
directory lies directly before the end records, and each entry points at a local header (30
bytes, the name again, an extra field) followed by the member's bytes. Sizes and offsets that
do not fit 32 bits are ``0xFFFFFFFF`` in the entry and are given by its zip64 extra field
(id 1), in the order uncompressed size, compressed size, local header offset.

Two readers share this parser: the fast record path (:mod:`shardfix.sources.fastrecord`), which
reads only the end of a record and a few local headers with ``pread``, and
:func:`check_zip_record`, which checks a whole record held in memory before ``torch.load``
decodes it (``torch.load`` checks no CRC-32 and not whether the record length is right). Both
accept only what torch writes: every member stored (method 0), inside the archive data, with
the same name in its local header. A member whose recorded CRC-32 is 0 (written with
``torch.serialization.set_crc32_options(False)``) is checked for bounds only. ``zlib.crc32``
releases the GIL and runs at a few GB/s.

Every problem raises :class:`ZipError` whose message completes "the record is damaged: ...".
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from shardfix.errors import IncompleteSourceError

EOCD = b"PK\x05\x06"
ZIP64_LOCATOR = b"PK\x06\x07"
ZIP64_EOCD = b"PK\x06\x06"
CENTRAL = b"PK\x01\x02"
LOCAL = b"PK\x03\x04"
U16_MAX = 0xFFFF
U32_MAX = 0xFFFFFFFF
#: Fixed sizes: end record, zip64 locator, zip64 end record, central entry, local header.
EOCD_SIZE, LOCATOR_SIZE, ZIP64_EOCD_SIZE, CENTRAL_SIZE, LOCAL_SIZE = 22, 20, 56, 46, 30
#: Bytes at the end of an archive that hold its end records whatever its comment's length.
END_SPAN = EOCD_SIZE + U16_MAX + LOCATOR_SIZE + ZIP64_EOCD_SIZE

Buffer = bytes | bytearray | memoryview
#: ``read(offset, n)``: up to ``n`` bytes at ``offset`` from the archive's first byte.
Reader = Callable[[int, int], Buffer]


class ZipError(Exception):
    """The archive is not an intact stored zip; the message says what is wrong."""


class Member(NamedTuple):
    """One central-directory entry."""

    name: str
    raw_name: bytes
    crc32: int
    size: int
    header_offset: int


class Directory(NamedTuple):
    """An archive's members by name, in directory order, and where member data ends (the directory's offset)."""

    members: dict[str, Member]
    data_end: int


#: A central entry from its byte 10: method, (time, date), CRC-32, sizes, name/extra/comment
#: lengths, (disk, attributes), local header offset.
_ENTRY = struct.Struct("<H4xIIIHHH8xI")
#: ``Member(...)`` runs NamedTuple's Python-level ``__new__`` (~0.5 us); the fast record path
#: builds 5-7 members per record, so they are built with the C-level tuple constructor instead.
_new_member = tuple.__new__


def _find_end(tail: bytes) -> int:
    """Offset in ``tail`` of the end-of-central-directory record whose comment ends ``tail`` exactly."""
    n = len(tail)
    pos = tail.rfind(EOCD, 0, n - EOCD_SIZE + 4) if n >= EOCD_SIZE else -1
    while pos >= 0:
        (comment,) = struct.unpack_from("<H", tail, pos + 20)
        if pos + EOCD_SIZE + comment == n:
            return pos
        pos = tail.rfind(EOCD, 0, pos + 3)
    raise ZipError("it does not end with a zip directory, so the record length in the metadata does not match "
                   "the archive (the record is cut short, runs into the next one, or is not a torch.save archive)")


def _read(read: Reader, offset: int, n: int) -> bytes:
    data = bytes(read(offset, n))
    if len(data) != n:
        raise ZipError("it ends before its zip directory does")
    return data


def _end_records(read: Reader, tail: bytes, tail_start: int) -> tuple[int, int, int, int]:
    """(entries, directory size, directory offset, where the directory must end)."""
    pos = _find_end(tail)
    _, _, _, count, cd_size, cd_off, _ = struct.unpack_from("<HHHHIIH", tail, pos + 4)
    loc = pos - LOCATOR_SIZE
    if loc >= 0 and tail[loc : loc + 4] == ZIP64_LOCATOR:
        (z64,) = struct.unpack_from("<Q", tail, loc + 8)
        rel = z64 - tail_start
        if z64 + ZIP64_EOCD_SIZE > tail_start + loc:
            raise ZipError("its zip64 directory record is missing")
        rec = tail[rel : rel + ZIP64_EOCD_SIZE] if rel >= 0 else _read(read, z64, ZIP64_EOCD_SIZE)
        if rec[:4] != ZIP64_EOCD:
            raise ZipError("its zip64 directory record is missing")
        count, cd_size, cd_off = struct.unpack_from("<QQQ", rec, 32)
        return count, cd_size, cd_off, z64
    if count == U16_MAX or U32_MAX in (cd_size, cd_off):
        raise ZipError("its zip64 directory locator is missing")
    return count, cd_size, cd_off, tail_start + pos


def _zip64_fields(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    """Replace the fields that are ``0xFFFFFFFF`` with the values of the zip64 extra field (id 1)."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            field = extra[pos + 4 : pos + 4 + size]
            values = iter(struct.unpack_from(f"<{len(field) // 8}Q", field))
            try:
                usize = next(values) if usize == U32_MAX else usize
                csize = next(values) if csize == U32_MAX else csize
                offset = next(values) if offset == U32_MAX else offset
            except StopIteration:
                raise ZipError("a zip64 size field is short") from None
            return usize, csize, offset
        pos += 4 + size
    raise ZipError("a zip64 size field is missing")


def _members(cd: bytes, count: int, data_end: int) -> dict[str, Member]:
    """Parse ``count`` central-directory entries; each must be stored, start inside the data and
    have a name of its own."""
    members: dict[str, Member] = {}
    pos = 0
    unpack = _ENTRY.unpack_from
    for _ in range(count):
        if pos + CENTRAL_SIZE > len(cd) or cd[pos : pos + 4] != CENTRAL:
            raise ZipError("its zip directory is corrupt")
        method, crc, csize, usize, nlen, xlen, clen, offset = unpack(cd, pos + 10)
        raw = cd[pos + 46 : pos + 46 + nlen]
        if U32_MAX in (usize, csize, offset):
            usize, csize, offset = _zip64_fields(cd[pos + 46 + nlen : pos + 46 + nlen + xlen], usize, csize, offset)
        name = raw.decode("utf-8", "replace")
        if method != 0 or csize != usize:
            raise ZipError(f"member {name} is compressed (method {method}); torch.save stores members uncompressed")
        if offset + LOCAL_SIZE > data_end:
            raise ZipError(f"member {name} has no local header where the directory says")
        if name in members:
            raise ZipError(f"member {name} appears twice in its zip directory")
        members[name] = _new_member(Member, (name, raw, crc, usize, offset))
        pos += CENTRAL_SIZE + nlen + xlen + clen
    if pos != len(cd):
        raise ZipError("its zip directory size does not match its entries")
    return members


def read_directory(read: Reader, length: int, *, tail: int = END_SPAN, max_members: int = 1 << 20,
                   max_directory: int | None = None) -> Directory:
    """Parse the central directory of the ``length``-byte archive that ``read`` reads.

    Args:
        read: ``read(offset, n)`` returns up to ``n`` bytes at ``offset`` of the archive.
        length: the archive's size; the end records must end exactly there.
        tail: bytes read from the end in one go to find the end records (the directory, when
            it lies inside them, needs no second read). Smaller than :data:`END_SPAN` accepts
            only archives whose comment fits.
        max_members, max_directory: refuse more entries, or a larger directory, than this.

    Raises:
        ZipError: the archive is not an intact zip whose directory ends it.
    """
    n = min(length, tail)
    tail_start = length - n
    buf = _read(read, tail_start, n)
    count, cd_size, cd_off, cd_end = _end_records(read, buf, tail_start)
    too_big = count > max_members or (max_directory is not None and cd_size > max_directory)
    if cd_off + cd_size != cd_end or too_big:
        raise ZipError("its zip directory points outside the record")
    rel = cd_off - tail_start
    cd = buf[rel : rel + cd_size] if rel >= 0 else _read(read, cd_off, cd_size)
    return Directory(_members(cd, count, cd_off), cd_off)


def data_offset(head: Buffer, member: Member, data_end: int) -> int:
    """Offset of ``member``'s first data byte, from the bytes at its local header.

    Args:
        head: bytes read at ``member.header_offset``: at least the 30-byte header and the name.
        member: the directory's entry.
        data_end: where member data ends (:attr:`Directory.data_end`).

    Raises:
        ZipError: no local header there, a different name, or data running past ``data_end``.
    """
    if len(head) < LOCAL_SIZE or head[:4] != LOCAL:
        raise ZipError(f"member {member.name} has no local header where the directory says")
    nlen, xlen = struct.unpack_from("<HH", head, 26)
    if head[LOCAL_SIZE : LOCAL_SIZE + nlen] != member.raw_name:
        raise ZipError(f"member {member.name} has a different name in its local header")
    start = member.header_offset + LOCAL_SIZE + nlen + xlen
    if start + member.size > data_end:
        raise ZipError(f"member {member.name} runs past the end of the archive data")
    return start


def crc_matches(data: Buffer, member: Member) -> bool:
    """Whether ``data`` has the member's recorded CRC-32 (always, when none was recorded)."""
    return not member.crc32 or zlib.crc32(data) == member.crc32


def check_archive(buf: memoryview) -> None:
    """Check a whole archive held in memory: directory, every local header, every CRC-32.

    Raises:
        ZipError: saying what is wrong.
    """
    directory = read_directory(lambda offset, n: buf[offset : offset + n], len(buf))
    for m in directory.members.values():
        start = data_offset(buf[m.header_offset : m.header_offset + LOCAL_SIZE + len(m.raw_name)], m,
                            directory.data_end)
        if not crc_matches(buf[start : start + m.size], m):
            raise ZipError(f"member {m.name} fails its CRC-32 check (its bytes changed after torch.save wrote them)")


def check_zip_record(data: Buffer, origin: Path | str, key: str) -> None:
    """Raise unless ``data`` is an intact torch.save zip archive that fills the record exactly.

    Args:
        data: the record's bytes (any buffer; not copied).
        origin: the file the record came from, for the message.
        key: the checkpoint key the record belongs to, for the message.

    Raises:
        IncompleteSourceError: naming ``origin`` and ``key``, saying what is wrong.
    """
    buf = memoryview(data).cast("B")
    try:
        check_archive(buf)
        return
    except (ZipError, struct.error, ValueError) as e:
        msg = str(e) if isinstance(e, ZipError) else f"its zip structure is corrupt ({e})"
    # raised outside the except block: a frame holding both ``e`` and views of ``data`` would be
    # a reference cycle, and the collector may then free the buffer before its views
    raise IncompleteSourceError(
        f"{origin}: the record for {key} ({len(buf)} bytes) is damaged: {msg}; copy the file again "
        "from the machine that saved it"
    )
