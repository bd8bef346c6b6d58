"""Positional reads: every ``pread``/``preadv`` loop in shardfix is one of these.

Reads never move a file offset, so one descriptor may be shared by threads and by readers that
jump between records. Two kinds of helper:

* ``*_upto`` read as much as the file holds, up to what was asked, looping over short reads, and
  return what they got: the caller decides what a short read means (the fast record path
  declines, the checksum loop stops). ``OSError`` passes through.
* :func:`fill` and :func:`read_exact` must get every byte; a file that ends early or a read
  error raises :class:`~shardfix.errors.IncompleteSourceError` naming the file and what was
  being read.

Linux returns at most about 2 GiB (0x7ffff000 bytes) from one read call, so one call never asks
for more than :data:`MAX_READ`.
"""

from __future__ import annotations

import os
from pathlib import Path

from shardfix.errors import IncompleteSourceError

#: Largest request passed to one ``preadv``: below the kernel's ~2 GiB per-call limit.
MAX_READ = 1 << 30


def fill_upto(fd: int, offset: int, dest: memoryview) -> int:
    """Fill ``dest`` from ``fd`` at ``offset``; return the bytes read (fewer only at end of file).

    Args:
        fd: an open file descriptor.
        offset: absolute file offset of ``dest[0]``.
        dest: a writable byte buffer (any size, including over 2 GiB).

    Raises:
        OSError: the read failed.
    """
    done, length = 0, len(dest)
    while done < length:
        n = os.preadv(fd, [dest[done : done + min(MAX_READ, length - done)]], offset + done)
        if n == 0:
            break
        done += n
    return done


def pread_upto(fd: int, offset: int, n: int) -> bytes:
    """Up to ``n`` bytes at ``offset`` as a new ``bytes`` (fewer only at end of file).

    For small reads (headers, directories); large ones should :func:`fill_upto` a buffer.

    Raises:
        OSError: the read failed.
    """
    data = os.pread(fd, n, offset)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = os.pread(fd, min(MAX_READ, n - got), offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def fill(fd: int, offset: int, dest: memoryview, origin: Path | str, what: str) -> None:
    """Fill ``dest`` from ``fd`` at ``offset`` with exactly ``len(dest)`` bytes.

    Args:
        fd: an open file descriptor.
        offset: absolute file offset of ``dest[0]``.
        dest: a writable byte buffer.
        origin: the file ``fd`` reads, for the message.
        what: what is being read (a key, "header"), for the message.

    Raises:
        IncompleteSourceError: the read failed or the file ends before ``offset + len(dest)``.
    """
    try:
        done = fill_upto(fd, offset, dest)
    except OSError as e:
        raise IncompleteSourceError(f"{origin}: read error for {what}: {e.strerror}") from e
    if done < len(dest):
        raise IncompleteSourceError(
            f"{origin}: ends after {offset + done} bytes while reading {what} "
            f"(needs {offset + len(dest)}); the file is truncated -- copy it again"
        )


def read_exact(fd: int, offset: int, length: int, origin: Path | str, what: str) -> bytearray:
    """Exactly ``length`` bytes at ``offset`` of ``fd`` in a new buffer (see :func:`fill`)."""
    buf = bytearray(length)
    fill(fd, offset, memoryview(buf), origin, what)
    return buf
