"""How the bench measures: peak RSS over a process tree, page-cache eviction, fsync, machine facts."""

from __future__ import annotations

import os
import platform
import shutil
import threading
import time
from pathlib import Path
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE")
GB = 10**9


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` (or ``path`` itself when it is a file)."""
    for p in sorted([path] if path.is_file() else path.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def copy_checkpoint(src: Path, out: Path) -> dict[str, Any]:
    """The I/O limit: copy the checkpoint's files (a file or a tree) to ``out`` and fsync them."""
    t0 = time.perf_counter()
    out.mkdir(parents=True)
    if src.is_file():
        shutil.copyfile(src, out / src.name)  # copy_file_range/sendfile: no user-space copy
    else:
        shutil.copytree(src, out / src.name, copy_function=shutil.copyfile)
    fsync_tree(out)
    return {"seconds": time.perf_counter() - t0}


def checkpoint_bytes(src: Path) -> int:
    """Bytes of every file of the checkpoint (a file or a tree)."""
    return src.stat().st_size if src.is_file() else sum(p.stat().st_size for p in src.rglob("*") if p.is_file())


def evict(path: Path) -> None:
    """Drop ``path``'s files from the page cache (clean pages only; no privileges needed)."""
    for p in [path] if path.is_file() else path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def own_peak_rss() -> int:
    """The kernel's peak for this process image (``VmHWM``). Not ru_maxrss: after fork + exec that still
    carries the forking parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's list: a child's parent may be any thread)."""
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(k) for k in f.read().split())
    except OSError:
        pass
    return kids


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


class TreeRss:
    """Sample the summed RSS of a process and all its descendants in a background thread (/proc)."""

    def __init__(self, pid: int, interval: float = 0.02, rescan: float = 0.1) -> None:
        self.root = pid
        self.interval, self.rescan = interval, rescan
        self.peak = 0
        self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        seen, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            seen.append(pid)
            todo.extend(_children(pid))
        return seen

    def _run(self) -> None:
        procs, last_scan = [self.root], 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now - last_scan > self.rescan:  # walking the tree costs more than reading RSS
                procs, last_scan = self._tree(), now
            total = sum(_rss(p) for p in procs)
            if total > self.peak:
                self.peak, self.peak_procs = total, len(procs)
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def machine() -> dict[str, Any]:
    """CPU, memory, versions and the load average: what a reader needs to judge the figures."""
    import torch

    cpu = "unknown"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import ray

        ray_version: str | None = ray.__version__
    except ImportError:
        ray_version = None
    mem = os.sysconf("SC_PHYS_PAGES") * PAGE
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray_version, "loadavg_at_start": os.getloadavg()}
