"""Positional reads: exact and up-to reads, short files, the per-call size cap, and error messages."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardfix.errors import IncompleteSourceError
from shardfix.io import preads
from shardfix.io.preads import MAX_READ, fill, fill_upto, pread_upto, read_exact

DATA = bytes(range(256)) * 40 + b"tail"


@pytest.fixture
def fd(tmp_path: Path) -> Iterator[int]:
    path = tmp_path / "data.bin"
    path.write_bytes(DATA)
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


def test_cap_is_below_the_kernel_limit() -> None:
    assert 0 < MAX_READ < 0x7FFFF000  # Linux returns at most 0x7ffff000 bytes from one read call


@pytest.mark.parametrize(("offset", "n"), [(0, 0), (0, len(DATA)), (5, 1000), (len(DATA) - 4, 4), (1234, 4321)])
def test_exact_reads(fd: int, tmp_path: Path, offset: int, n: int) -> None:
    assert read_exact(fd, offset, n, tmp_path / "data.bin", "k") == DATA[offset : offset + n]
    assert pread_upto(fd, offset, n) == DATA[offset : offset + n]
    buf = bytearray(n)
    assert fill_upto(fd, offset, memoryview(buf)) == n and buf == DATA[offset : offset + n]


def test_upto_reads_stop_at_the_end(fd: int) -> None:
    buf = bytearray(b"\xee" * 100)
    assert fill_upto(fd, len(DATA) - 10, memoryview(buf)) == 10
    assert buf[:10] == DATA[-10:] and buf[10:] == b"\xee" * 90  # nothing past the end is touched
    assert fill_upto(fd, len(DATA) + 5, memoryview(buf)) == 0
    assert pread_upto(fd, len(DATA) - 3, 50) == DATA[-3:]
    assert pread_upto(fd, len(DATA), 50) == b""


def test_loops_in_capped_calls(fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large requests are split into calls of at most MAX_READ bytes (shrunk here to 7)."""
    calls: list[int] = []
    real = os.preadv

    def counting(fd_: int, buffers: list[memoryview], offset: int) -> int:
        calls.append(sum(len(b) for b in buffers))
        return real(fd_, buffers, offset)

    monkeypatch.setattr(preads, "MAX_READ", 7)
    monkeypatch.setattr(preads.os, "preadv", counting)
    buf = bytearray(100)
    assert fill_upto(fd, 3, memoryview(buf)) == 100 and buf == DATA[3:103]
    assert max(calls) == 7 and len(calls) == 15
    calls.clear()
    assert fill_upto(fd, len(DATA) - 10, memoryview(bytearray(30))) == 10
    assert calls == [7, 7, 7]  # 7, then 3 of 7 at the end, then 0: end of file


def test_truncation_names_file_and_what(fd: int, tmp_path: Path) -> None:
    origin = tmp_path / "data.bin"
    with pytest.raises(IncompleteSourceError) as err:
        read_exact(fd, len(DATA) - 10, 50, origin, "model.w")
    assert str(err.value) == (f"{origin}: ends after {len(DATA)} bytes while reading model.w (needs "
                              f"{len(DATA) + 40}); the file is truncated -- copy it again")


def test_read_error_names_file(tmp_path: Path) -> None:
    d = os.open(tmp_path, os.O_RDONLY)  # a directory: read() fails with EISDIR
    try:
        with pytest.raises(IncompleteSourceError, match=f"{tmp_path}: read error for header: "):
            fill(d, 0, memoryview(bytearray(8)), tmp_path, "header")
        with pytest.raises(IsADirectoryError):
            pread_upto(d, 0, 8)  # the up-to helpers leave OSError to the caller
    finally:
        os.close(d)
