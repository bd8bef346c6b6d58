"""What shardfix may open as a checkpoint file: regular files inside the checkpoint, checked before opening.

Two rules, enforced in one place:

* **Regular files only.** A FIFO blocks ``open`` until a writer appears, a character device
  (``/dev/zero``) never ends, a socket cannot be read. Every path is ``stat``-ed before it is
  opened and anything but a regular file is refused; :func:`open_regular` also opens with
  ``O_NONBLOCK`` and re-checks the open descriptor, so a file swapped for a FIFO between the two
  steps still cannot block.
* **Never read outside the checkpoint.** A symlink inside the checkpoint directory that
  resolves outside it would make shardfix read (and write into OUT) a file the user never
  named. :func:`scan_checkpoint` walks the checkpoint before any reader opens a file and
  refuses such a link, unless ``--follow-symlinks`` allows it; the resolved paths are then
  returned so the report's ``source.notes`` can list them.

:func:`scan_checkpoint` is called once by :func:`shardfix.layouts.open_checkpoint`, before any
format or layout reader runs; the low-level openers (:func:`open_regular`) guard the readers
that can also be reached on their own.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from shardfix.errors import BadInputError

#: Entries scanned at most; a checkpoint directory with more is refused (not read blindly).
MAX_ENTRIES = 1_000_000
_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _refuse_kind(path: Path | str, mode: int) -> BadInputError:
    return BadInputError(f"{path}: is {_kind(mode)}, not a regular file; a checkpoint file must be a regular file "
                         "(shardfix does not read pipes or devices, which can block or never end) -- copy the real file there")


def check_regular(path: Path | str) -> os.stat_result:
    """``stat`` ``path`` (following links) and refuse anything but a regular file; nothing is opened.

    Raises:
        BadInputError: naming the path: it is missing, unreadable, or a FIFO, device, socket or directory.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise BadInputError(f"{path}: cannot read ({e.strerror})") from e
    if not stat.S_ISREG(st.st_mode):
        raise _refuse_kind(path, st.st_mode)
    return st


def is_regular(path: Path | str) -> bool:
    """Whether ``path`` is a regular file (following links); for readers that skip what they cannot read."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def open_regular(path: Path | str) -> int:
    """Open ``path`` read-only after :func:`check_regular`; the descriptor is re-checked, so it never blocks.

    Raises:
        BadInputError: as :func:`check_regular`, or the open failed.
    """
    check_regular(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise BadInputError(f"{path}: cannot open ({e.strerror})") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # swapped between stat and open
        os.close(fd)
        raise _refuse_kind(path, st.st_mode)
    os.set_blocking(fd, True)
    return fd


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def scan_checkpoint(src: Path | str, follow_symlinks: bool = False) -> list[str]:
    """Check every entry of the checkpoint ``src`` before anything is opened.

    ``src`` itself may be a symlink (the user named it). Inside it, every file must be a regular
    file (or a symlink to one) and every symlink must resolve inside ``src``, unless
    ``follow_symlinks``.

    Returns:
        one note per symlink followed to a path outside ``src`` (empty unless ``follow_symlinks``).

    Raises:
        BadInputError: naming the first link that leaves ``src`` (or is broken or loops) or the
            first FIFO, device or socket.
    """
    top = Path(src)
    try:
        st = os.stat(top)
    except FileNotFoundError:
        return []  # the caller says "no such file or directory"
    except OSError as e:
        raise BadInputError(f"{top}: cannot read ({e.strerror})") from e
    if not stat.S_ISDIR(st.st_mode):
        check_regular(top)
        return []
    root = top.resolve()
    notes: list[str] = []
    stack, seen = [top], 0
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError as e:
            raise BadInputError(f"{d}: cannot list ({e.strerror})") from e
        for entry in entries:
            seen += 1
            if seen > MAX_ENTRIES:
                raise BadInputError(f"{top}: holds over {MAX_ENTRIES:,} files; pass the checkpoint directory itself, "
                                    "not a directory above it")
            p = Path(entry.path)
            if entry.is_symlink():
                note = _check_link(p, root, follow_symlinks)
                if note:
                    notes.append(note)
                continue  # a link is checked, never descended into (no loops, no second walk)
            if entry.is_dir(follow_symlinks=False):
                stack.append(p)
                continue
            mode = entry.stat(follow_symlinks=False).st_mode
            if not stat.S_ISREG(mode):
                raise _refuse_kind(p, mode)
    return notes


def _check_link(link: Path, root: Path, follow: bool) -> str | None:
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise BadInputError(f"{link}: a symlink that is broken or loops ({e}); fix or remove it") from e
    st = os.stat(target)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise _refuse_kind(link, st.st_mode)
    if _inside(target, root):
        return None
    if not follow:
        raise BadInputError(f"{link}: a symlink to {target}, outside the checkpoint {root}; shardfix reads only files "
                            "inside the checkpoint -- copy the file in, or pass --follow-symlinks if you mean it")
    return f"--follow-symlinks: {link} was read from {target}, outside the checkpoint"
