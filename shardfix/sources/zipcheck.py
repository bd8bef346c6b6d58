"""Check a ``torch.save`` zip archive held in memory before torch decodes it.

``torch.load`` does not check the CRC-32 that ``torch.save`` stores for each member: a flipped
bit in a tensor's bytes loads silently as a wrong value. :func:`check_zip_record` walks the
archive's central directory and checks that

* the archive ends exactly where the record ends (so the record length in the metadata is
  right: a shorter range cuts the directory off, a longer one leaves bytes after it);
* every member lies inside the record, is stored uncompressed (as torch writes it) and has the
  CRC-32 recorded for it.

Archives written with ``torch.serialization.set_crc32_options(False)`` record a CRC of 0; those
members are checked for bounds only. ``zlib.crc32`` releases the GIL and runs at a few GB/s.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from shardfix.errors import IncompleteSourceError

_EOCD = b"PK\x05\x06"
_EOCD64 = b"PK\x06\x06"
_LOCATOR64 = b"PK\x06\x07"
_CENTRAL = b"PK\x01\x02"
_LOCAL = b"PK\x03\x04"
_MAX_COMMENT = 0xFFFF
_MAX_MEMBERS = 1 << 20


class _Bad(Exception):
    pass


def _find_eocd(buf: memoryview) -> int:
    """Offset of the end-of-central-directory record that ends exactly at ``len(buf)``."""
    n = len(buf)
    lo = max(0, n - 22 - _MAX_COMMENT)
    pos = n - 22
    while pos >= lo:
        if buf[pos : pos + 4] == _EOCD:
            (comment,) = struct.unpack_from("<H", buf, pos + 20)
            if pos + 22 + comment == n:
                return pos
        pos -= 1
    raise _Bad("it does not end with a zip directory, so the record length in the metadata does not match "
               "the archive (the record is cut short, runs into the next one, or is not a torch.save archive)")


def _directory(buf: memoryview, eocd: int) -> tuple[int, int, int]:
    """(entries, directory size, directory offset), following the zip64 records when present."""
    _, _, _, total, cd_size, cd_off, _ = struct.unpack_from("<HHHHIIH", buf, eocd + 4)
    if total == 0xFFFF or cd_size == 0xFFFFFFFF or cd_off == 0xFFFFFFFF:
        loc = eocd - 20
        if loc < 0 or buf[loc : loc + 4] != _LOCATOR64:
            raise _Bad("its zip64 directory locator is missing")
        (rec,) = struct.unpack_from("<Q", buf, loc + 8)
        if rec + 56 > loc or buf[rec : rec + 4] != _EOCD64:
            raise _Bad("its zip64 directory record is missing")
        total, cd_size, cd_off = struct.unpack_from("<QQQ", buf, rec + 32)
        end = rec
    else:
        end = eocd
    if cd_off + cd_size > end or total > _MAX_MEMBERS:
        raise _Bad("its zip directory points outside the record")
    return total, cd_size, cd_off


def _zip64_sizes(extra: memoryview, csize: int, usize: int, offset: int) -> tuple[int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        if tag == 0x0001:
            vals = []
            field = extra[pos + 4 : pos + 4 + size]
            for i in range(len(field) // 8):
                vals.append(struct.unpack_from("<Q", field, 8 * i)[0])
            it = iter(vals)
            try:
                if usize == 0xFFFFFFFF:
                    usize = next(it)
                if csize == 0xFFFFFFFF:
                    csize = next(it)
                if offset == 0xFFFFFFFF:
                    offset = next(it)
            except StopIteration:
                raise _Bad("a zip64 size field is short") from None
            break
        pos += 4 + size
    return csize, usize, offset


def _check(buf: memoryview) -> None:
    eocd = _find_eocd(buf)
    total, cd_size, cd_off = _directory(buf, eocd)
    pos, end = cd_off, cd_off + cd_size
    for _ in range(total):
        if pos + 46 > end or buf[pos : pos + 4] != _CENTRAL:
            raise _Bad("its zip directory is corrupt")
        (method, crc, csize, usize, n_name, n_extra, n_comment) = struct.unpack_from("<HxxxxIIIHHH", buf, pos + 10)
        (offset,) = struct.unpack_from("<I", buf, pos + 42)
        name = bytes(buf[pos + 46 : pos + 46 + n_name])
        extra = buf[pos + 46 + n_name : pos + 46 + n_name + n_extra]
        csize, usize, offset = _zip64_sizes(extra, csize, usize, offset)
        pos += 46 + n_name + n_extra + n_comment
        label = name.decode("utf-8", "replace")
        if method != 0 or csize != usize:
            raise _Bad(f"member {label} is compressed (method {method}); torch.save stores members uncompressed")
        if offset + 30 > cd_off or buf[offset : offset + 4] != _LOCAL:
            raise _Bad(f"member {label} has no local header where the directory says")
        ln, le = struct.unpack_from("<HH", buf, offset + 26)
        if bytes(buf[offset + 30 : offset + 30 + ln]) != name:
            raise _Bad(f"member {label} has a different name in its local header")
        start = offset + 30 + ln + le
        if start + csize > cd_off:
            raise _Bad(f"member {label} runs past the end of the archive data")
        if crc and zlib.crc32(buf[start : start + csize]) != crc:
            raise _Bad(f"member {label} fails its CRC-32 check (its bytes changed after torch.save wrote them)")
    if pos != end:
        raise _Bad("its zip directory size does not match its entries")


def check_zip_record(data: bytes | bytearray | memoryview, origin: Path | str, key: str) -> None:
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
        _check(buf)
        return
    except (_Bad, struct.error, ValueError) as e:
        msg = str(e) if isinstance(e, _Bad) else f"its zip structure is corrupt ({e})"
    # raised outside the except block: a frame holding both ``e`` and views of ``data`` would be
    # a reference cycle, and the collector may then free the buffer before its views
    raise IncompleteSourceError(
        f"{origin}: the record for {key} ({len(buf)} bytes) is damaged: {msg}; copy the file again "
        "from the machine that saved it"
    )
