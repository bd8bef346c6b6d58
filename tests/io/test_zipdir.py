"""The one zip-directory parser: real ``torch.save`` archives, zip64 extras, and crafted damage.

Real archives come from ``torch.save`` (which always writes the zip64 end records) and from
Python's ``zipfile`` (plain end record, comments); zip64 *extra fields* (sizes and offsets of
``0xFFFFFFFF``) need a 4 GB member to appear naturally, so :func:`_zip` writes them for small
members, byte for byte as the zip specification lays them out.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from shardfix.errors import IncompleteSourceError
from shardfix.io import zipdir
from shardfix.io.preads import pread_upto
from shardfix.io.zipdir import ZipError, check_archive, check_zip_record, crc_matches, data_offset, read_directory

U32 = 0xFFFFFFFF


def _saved(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def _mem(data: bytes) -> zipdir.Directory:
    view = memoryview(data)
    return read_directory(lambda o, n: view[o : o + n], len(data))


def _zip(members: list[tuple[bytes, bytes]], *, zip64: bool = False, locator: bool = True, comment: bytes = b"",
         extra_values: int = 3) -> bytes:
    """A stored zip; with ``zip64`` every size and offset goes to zip64 extras and zip64 end records."""
    out, central = bytearray(), bytearray()
    for name, data in members:
        crc, lho = zlib.crc32(data), len(out)
        out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 45, 0, 0, 0, 0, crc, len(data), len(data), len(name), 0)
        out += name + data
        if zip64:
            values = (len(data), len(data), lho)[:extra_values]
            extra = struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values)
            sizes: tuple[int, int, int] = (U32, U32, U32)
        else:
            extra, sizes = b"", (len(data), len(data), lho)
        central += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 45, 45, 0, 0, 0, 0, crc, sizes[0], sizes[1],
                               len(name), len(extra), 0, 0, 0, 0, sizes[2]) + name + extra
    cd_off, cd_size, count = len(out), len(central), len(members)
    out += central
    if zip64:
        z64 = len(out)
        out += struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, cd_size, cd_off)
        if locator:
            out += struct.pack("<4sIQI", b"PK\x06\x07", 0, z64, 1)
        count, cd_size, cd_off = 0xFFFF, U32, U32
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, cd_size, cd_off, len(comment)) + comment
    return bytes(out)


def test_torch_save_archive_members_and_bytes() -> None:
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    data = _saved(t)
    d = _mem(data)
    prefix = next(iter(d.members)).split("/")[0]
    assert {f"{prefix}/data.pkl", f"{prefix}/data/0", f"{prefix}/byteorder"} <= set(d.members)
    m = d.members[f"{prefix}/data/0"]
    start = data_offset(data[m.header_offset : m.header_offset + 100], m, d.data_end)
    assert data[start : start + m.size] == t.numpy().tobytes()
    assert m.crc32 and crc_matches(data[start : start + m.size], m)
    check_archive(memoryview(data))
    check_zip_record(data, "f.distcp", "k")


def test_pread_reader_inside_a_larger_file(tmp_path: Path) -> None:
    """The fast record path's way: records at odd offsets of one file, only the last 4 KiB read first."""
    records = [_saved(torch.randn(n, 3)) for n in (1, 50, 700)]
    path = tmp_path / "r.distcp"
    spans, blob = [], bytearray(b"\x00junk")
    for r in records:
        spans.append((len(blob), len(r)))
        blob += r + b"PK\x05\x06 not a record"
    path.write_bytes(blob)
    fd = os.open(path, os.O_RDONLY)
    try:
        for (base, length), rec in zip(spans, records, strict=True):
            d = read_directory(lambda o, n, base=base: pread_upto(fd, base + o, n), length, tail=4096, max_members=64)
            assert d == _mem(rec)
    finally:
        os.close(fd)


@pytest.mark.parametrize("comment", [b"", b"hello", b"PK\x05\x06" + bytes(16) + b"\x05\x00", b"x" * 5000])
@pytest.mark.parametrize("zip64", [False, True])
def test_crafted_zip64_extras_and_comments(zip64: bool, comment: bytes) -> None:
    members = [(b"a/data.pkl", b"pickle bytes"), (b"a/data/0", bytes(range(256)) * 3), (b"a/empty", b"")]
    data = _zip(members, zip64=zip64, comment=comment)
    d = _mem(data)
    assert [(m.name, m.size) for m in d.members.values()] == [(n.decode(), len(b)) for n, b in members]
    for (_, body), m in zip(members, d.members.values(), strict=True):
        start = data_offset(data[m.header_offset :], m, d.data_end)
        assert data[start : start + m.size] == body
    check_archive(memoryview(data))
    if len(comment) > 4000:  # the fast path reads 4 KiB from the end: such an archive is declined there
        with pytest.raises(ZipError, match="does not end with a zip directory"):
            read_directory(lambda o, n: data[o : o + n], len(data), tail=4096)


def test_python_zipfile_with_comment() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("x/data.pkl", b"abc")
        z.writestr("x/data/0", bytes(1000))
        z.comment = b"PK\x05\x06 a comment that looks like an end record"
    check_archive(memoryview(buf.getvalue()))
    assert set(_mem(buf.getvalue()).members) == {"x/data.pkl", "x/data/0"}


def _damaged(data: bytes) -> str:
    with pytest.raises(ZipError) as err:
        check_archive(memoryview(data))
    return str(err.value)


def test_damage_is_named() -> None:
    good = _zip([(b"a/data.pkl", b"p"), (b"a/data/0", b"0123456789")], zip64=True)
    assert "does not end with a zip directory" in _damaged(good[:-1])
    assert "does not end with a zip directory" in _damaged(good + b"\x00")
    assert "does not end with a zip directory" in _damaged(b"not a zip at all, just bytes")
    # bytes before the archive: every offset it records is off by their count
    assert "zip64 directory record is missing" in _damaged(b"\x00" * 7 + good)
    assert "points outside the record" in _damaged(b"\x00" * 7 + _zip([(b"a/data/0", b"0123456789")]))
    flipped = bytearray(good)
    flipped[good.index(b"0123456789") + 3] ^= 1
    assert "member a/data/0 fails its CRC-32 check" in _damaged(bytes(flipped))
    renamed = bytearray(good)
    renamed[30 + 2] ^= 0x20  # the first local header's name: a/data.pkl -> a/Data.pkl
    assert "member a/data.pkl has a different name in its local header" in _damaged(bytes(renamed))
    assert "zip64 directory locator is missing" in _damaged(_zip([(b"a", b"1")], zip64=True, locator=False))
    assert "zip64 size field is short" in _damaged(_zip([(b"a", b"1")], zip64=True, extra_values=2))
    assert "appears twice" in _damaged(_zip([(b"a", b"1"), (b"a", b"2")]))


def test_compressed_member_is_refused() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a/data/0", bytes(4000))
    assert "member a/data/0 is compressed (method 8)" in _damaged(buf.getvalue())


def test_member_pointing_past_the_data() -> None:
    data = bytearray(_zip([(b"a", b"12345")]))
    cd = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, cd + 42, cd)  # local header offset = the directory itself
    assert "member a has no local header where the directory says" in _damaged(bytes(data))


def test_check_zip_record_names_file_and_key() -> None:
    flipped = _saved(torch.ones(64))
    i = flipped.index(torch.ones(64).numpy().tobytes())
    flipped = flipped[:i] + b"\x01" + flipped[i + 1 :]  # the first byte of 1.0f is 0x00
    with pytest.raises(IncompleteSourceError, match=r"r\.distcp: the record for model\.w \(\d+ bytes\) is damaged: "
                                                    r"member .*data/0 fails its CRC-32 check"):
        check_zip_record(flipped, "r.distcp", "model.w")
    with pytest.raises(IncompleteSourceError, match="record length in the metadata does not match"):
        check_zip_record(flipped[:-3], "r.distcp", "model.w")


def test_no_recorded_crc_means_bounds_only() -> None:
    """``set_crc32_options(False)`` writes CRC 0: such members are checked for bounds only."""
    torch.serialization.set_crc32_options(False)
    try:
        data = _saved(torch.ones(16))
    finally:
        torch.serialization.set_crc32_options(True)
    d = _mem(data)
    assert all(m.crc32 == 0 for m in d.members.values())
    i = data.index(torch.ones(16).numpy().tobytes())
    check_archive(memoryview(data[:i] + b"\x07" + data[i + 1 :]))
