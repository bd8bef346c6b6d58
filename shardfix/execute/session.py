"""One run's hold on the output directory: the checks before anything is written, the lock, the
manifest, and the order in which finished files appear in OUT.

Before OUT is touched: OUT must not be SRC, hold a source file, or lie inside a source directory
(whatever the flags); OUT and its staging directory must not be symlinks; a staging directory the
manifest does not vouch for is refused. Then an exclusive ``fcntl.flock`` on ``OUT/.shardfix-lock``
keeps a second run out (it is refused, exit 2, naming the pid holding the lock). Files in OUT that
the manifest does not prove are shardfix's are *foreign*: a run refuses them (exit 2, naming
them) unless ``--keep-foreign``, which leaves them untouched; a foreign file with the name of a file
the run would write is refused always. ``--overwrite`` removes only the owned files.

Publishing (:meth:`OutputSession.publish`) keeps "OUT never looks complete when it is not" when the
disk fills at any point: every byte is written before the first file appears in OUT -- data files,
index files and sidecars in staging, the manifest listing them, a report with ``"status":
"incomplete"`` in OUT, and the final report in staging. What follows are renames, which need no
space: the files into OUT, then the final report over the marker.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shardfix.errors import OutputError
from shardfix.outputs import REPORT_NAME, STAGING
from shardfix.outputs.manifest import LOCK_NAME, Manifest, entries, split_owned
from shardfix.outputs.writer import file_checksum, json_bytes, write_bytes_atomic

_SHOW = 10


def _names(names: Iterable[str]) -> str:
    names = list(names)
    more = f" and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
    return ", ".join(names[:_SHOW]) + more


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_overlap(out: Path, src: Path, files: Iterable[str]) -> None:
    """Refuse an OUT that is SRC, holds SRC or a source file, or lies inside a source directory."""
    o, s = out.resolve(), src.resolve()
    if o == s:
        raise OutputError(f"{out}: is the source checkpoint itself; pick another output directory")
    if _inside(s, o):
        raise OutputError(f"{out}: contains the source {src}; writing there could delete or replace it -- "
                          "pick an output directory outside the checkpoint")
    if s.is_dir() and _inside(o, s):
        raise OutputError(f"{out}: lies inside the source directory {src}; pick an output directory outside it")
    inside = [f for f in files if _inside(Path(f).resolve(), o)]
    if inside:
        raise OutputError(f"{out}: holds source file(s) {_names(inside)}; writing there could replace them -- "
                          "pick another output directory")


def _lock(out: Path) -> int:
    try:
        fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise OutputError(f"{out / LOCK_NAME}: cannot open the lock file ({e.strerror}); remove it if it is "
                          "not a regular file") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise OutputError(f"{out}: another shardfix run (pid {holder}) is writing into it; wait for it to "
                          "finish or pick another output directory") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _check_staging(out: Path, manifest: Manifest | None) -> bool:
    """Whether our staging directory exists; refuse one shardfix did not create."""
    staging = out / STAGING
    if not os.path.lexists(staging):
        return False
    if staging.is_symlink() or not staging.is_dir():
        raise OutputError(f"{staging}: is a symlink or not a directory; shardfix never writes through it -- "
                          "remove it or pick another output directory")
    if manifest is None or not manifest.staging:
        raise OutputError(f"{staging}: was not created by shardfix (no manifest vouches for it); remove it or "
                          "pick another output directory")
    return True


def _dump(obj: object) -> bytes:
    """The report as strict JSON (non-finite floats as strings, like every JSON shardfix writes)."""
    return json_bytes(obj)


def _write_atomic(path: Path, data: bytes) -> None:
    write_bytes_atomic(path, data, "; free space and rerun with --resume")


class OutputSession:
    """OUT held by this run: its lock, manifest and the foreign files it keeps (see the module docstring)."""

    def __init__(self, out: Path, lock_fd: int, manifest: Manifest, kept: list[str]) -> None:
        self.out = out
        self.lock_fd = lock_fd
        self.manifest = manifest
        self.kept_foreign = kept

    def close(self) -> None:
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # releases the flock; the lock file stays (unlinking it would race)
            self.lock_fd = -1

    def __enter__(self) -> OutputSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def owns(self, name: str) -> bool:
        return self.manifest.owns(name)

    def remove_owned(self, name: str) -> None:
        if self.manifest.owns(name):
            (self.out / name).unlink()
            self.manifest.forget(name)

    def write_report(self, report: dict[str, Any]) -> None:
        """Place a report (a failure report) directly: recorded in the manifest, then written."""
        path = self.out / REPORT_NAME
        if os.path.lexists(path) and not self.manifest.owns(REPORT_NAME):
            raise OutputError(f"{path}: is not shardfix's; not replacing it")
        data = _dump(report)
        self.manifest.add_bytes(REPORT_NAME, data)
        self.manifest.save()
        _write_atomic(path, data)

    def publish(self, final: dict[str, Any], marker: dict[str, Any], known: dict[str, tuple[int, str]]) -> None:
        """Move everything staged into OUT, the final report last (see the module docstring).

        Args:
            final: the report to leave in OUT.
            marker: the same report with ``status: "incomplete"``, in OUT while files move.
            known: size and xxh3-128 of staged files already hashed while written (not re-read).
        """
        staging = self.out / STAGING
        names = [n for n in entries(staging, ())
                 if not n.endswith(".done.json") and ".tmp-" not in n and n != REPORT_NAME]
        clash = [n for n in names if os.path.lexists(self.out / n) and not self.manifest.owns(n)]
        if clash:
            raise OutputError(f"{self.out}: file(s) {_names(clash)} are not shardfix's and would be replaced; "
                              "move them away and rerun with --resume")
        for n in names:
            size, digest = known.get(n) or ((staging / n).stat().st_size, file_checksum(staging / n))
            self.manifest.add(n, size, digest)
        marker_bytes, final_bytes = _dump(marker), _dump(final)
        self.manifest.add_bytes(REPORT_NAME, marker_bytes)
        self.manifest.add_bytes(REPORT_NAME, final_bytes)
        self.manifest.save()
        _write_atomic(self.out / REPORT_NAME, marker_bytes)
        _write_atomic(staging / REPORT_NAME, final_bytes)
        stale, _ = split_owned(self.out, self.manifest)
        for n in names:
            (self.out / n).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / n, self.out / n)
        for n in stale:
            if n not in names and n != REPORT_NAME:  # an owned file this run does not produce (e.g. old shards)
                (self.out / n).unlink(missing_ok=True)
                self.manifest.forget(n)
        os.replace(staging / REPORT_NAME, self.out / REPORT_NAME)
        shutil.rmtree(staging, ignore_errors=True)
        try:
            self.manifest.save()
        except OutputError:  # the manifest already lists every placed file; this save only drops stale names
            pass


def _refuse_foreign(out: Path, foreign: list[str], write_names: set[str], keep_foreign: bool) -> None:
    clash = [n for n in foreign if n in write_names]
    if clash:
        others = [n for n in foreign if n not in clash]
        also = f" (other files shardfix did not write: {_names(others)})" if others else ""
        raise OutputError(f"{out}: {_names(clash)} not written by shardfix but this run would write a file of that "
                          f"name; move it away (shardfix never replaces files it did not write){also}")
    if foreign and not keep_foreign:
        raise OutputError(f"{out}: holds files shardfix did not write ({_names(foreign)}); refusing to delete "
                          "them -- pick an empty directory, or pass --keep-foreign to leave them untouched "
                          "and write beside them")


def open_output(out: Path, *, src: Path, source_files: Iterable[str], write_names: set[str], overwrite: bool,
                resume: bool, keep_foreign: bool) -> OutputSession:
    """Check, create and lock ``out`` for a run; clear our own earlier output with ``overwrite``."""
    if out.is_symlink():
        raise OutputError(f"{out}: is a symlink; give the real directory it points to")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory; pick another output path")
    check_overlap(out, src, source_files)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create ({e.strerror})") from e
    fd = _lock(out)
    try:
        manifest = Manifest.load(out)
        staged = _check_staging(out, manifest)
        owned, foreign = split_owned(out, manifest)
        if (owned or staged or (foreign and not keep_foreign)) and not (overwrite or resume):
            theirs = f" (files shardfix did not write: {_names(foreign)}; --keep-foreign leaves them untouched)" \
                if foreign else ""
            raise OutputError(f"{out}: already exists and is not empty; pass --overwrite to replace it or --resume "
                              f"to finish an interrupted conversion{theirs}")
        _refuse_foreign(out, foreign, write_names, keep_foreign)
        manifest = manifest or Manifest(out)
        if overwrite:
            for name in owned:
                (out / name).unlink()
                manifest.forget(name)
            if staged:
                shutil.rmtree(out / STAGING)
        (out / STAGING).mkdir(exist_ok=True)
        manifest.staging = True
        manifest.save()
    except BaseException:
        os.close(fd)
        raise
    return OutputSession(out, fd, manifest, foreign)
