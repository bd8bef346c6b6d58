"""``--executor auto``: inline or Ray, from measured costs, with the reason in words."""

from __future__ import annotations

import os

from shardfix.plan import Plan

#: What ``--executor auto`` weighs, measured with ``scripts/bench`` on the reference machine
#: (2 CPUs, README "Performance"): one process converts a DCP checkpoint at about 1 GB/s
#: (streamed from the page cache to the output disk, fsync included) ...
INLINE_GBPS = 1.0
#: ... while a local Ray instance costs 6-7 s before it has done any work on a quiet machine
#: (``ray.init``, then every worker importing torch, and ~1.5 s to shut down) and 13-22 s on
#: a loaded one.
RAY_START_S = 10.0
#: Parallel file tasks stop paying once the disk is saturated; lacking a measurement of the
#: output disk, assume it absorbs about this many concurrent streams at full speed.
DISK_STREAMS = 4


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_executor(plan: Plan, requested: str, workers: int | None, ray_address: str | None) -> tuple[str, str]:
    """Pick ``inline`` or ``ray`` for ``--executor auto`` and say why.

    ``ray_address`` is the effective address: ``--ray-address`` or ``RAY_ADDRESS``. Otherwise
    Ray is chosen only when its estimated time -- start-up plus the work split over the files
    that can run at once (bounded by CPUs, ``--workers``, files and the disk) -- beats
    converting inline; see :data:`INLINE_GBPS` and :data:`RAY_START_S`.
    """
    if requested != "auto":
        return requested, f"--executor {requested}"
    if ray_address:
        return "ray", f"Ray cluster at {ray_address} (--ray-address or RAY_ADDRESS): run on it"
    n_files = len(plan.files)
    cpus = usable_cpus()
    gb = plan.total_bytes / 1e9
    inline_s = gb / INLINE_GBPS
    if n_files < 2:
        return "inline", "one output file: nothing to run in parallel (a file is one task)"
    parallel = min(workers or cpus, cpus, n_files, DISK_STREAMS)
    if parallel < 2:
        limit = "--workers 1" if workers == 1 else f"{cpus} usable CPU(s)"
        return "inline", f"{limit}: no parallelism for Ray to add"
    ray_s = RAY_START_S + inline_s / parallel
    estimate = (f"{gb:.2f} GB: ~{inline_s:.0f} s inline at ~{INLINE_GBPS:g} GB/s vs ~{ray_s:.0f} s on Ray "
                f"(~{RAY_START_S:.0f} s to start, then {parallel} files at a time)")
    if ray_s >= inline_s:
        return "inline", estimate
    return "ray", estimate
