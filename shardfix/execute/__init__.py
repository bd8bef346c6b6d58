"""Run a plan: one task per output file, through a registered executor, then finish the directory.

Executors (:data:`EXECUTORS`: ``inline``, ``ray``) implement :class:`~shardfix.execute.base.Executor`
and call the same task body, :func:`~shardfix.execute.task.write_file_task`, with a typed
:class:`~shardfix.execute.context.TaskContext`. Only when every file is staged does
:func:`~shardfix.execute.outdir.finish` write the index files and sidecars next to them; the caller
then publishes everything with the report (:mod:`shardfix.execute.session`) -- so an interrupted run
never looks complete, and ``--resume`` reuses staged files whose fingerprints and checksums still match.

May import: ``plan`` (types), ``outputs`` (layout, writer), ``sources``, ``reconcile.ops``, ``io``.
Adding an executor is one module defining ``NAME`` and ``EXECUTOR`` plus one line in :data:`EXECUTORS`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from shardfix.errors import InternalError
from shardfix.execute import inline, ray
from shardfix.execute.base import Executor, RunRequest
from shardfix.execute.choose import choose_executor
from shardfix.execute.context import CompanionsRef, Faults, TaskContext
from shardfix.execute.outdir import finish, staged_result
from shardfix.execute.progress import Progress
from shardfix.execute.task import check_cuda_here, clip_ranges, drop_cached_sources, write_file_task
from shardfix.options import ConvertOptions
from shardfix.outputs import STAGING, get_layout
from shardfix.plan import OutputFile, Plan

__all__ = ["EXECUTORS", "STAGING", "Faults", "Progress", "TaskContext", "check_device", "choose_executor",
           "check_ray_address", "clip_ranges", "execute", "write_file_task"]

log = logging.getLogger(__name__)

EXECUTORS: dict[str, Executor] = {m.NAME: m.EXECUTOR for m in (inline, ray)}


def effective_address(opts: ConvertOptions) -> str | None:
    return ray.resolve_address(opts.ray_address) if opts.executor != "inline" else None


def check_ray_address(opts: ConvertOptions) -> None:
    """Fail early (exit 2) when the Ray cluster to join refuses us (wrong or missing token), before OUT exists."""
    address = effective_address(opts)
    if address and opts.executor != "inline":
        ray.probe_cluster(address)


def check_device(opts: ConvertOptions) -> None:
    """Fail early (exit 2) when ``--device cuda`` will run on this machine and it has no GPU.

    On a Ray cluster the check is the cluster's GPU count, made once connected.
    """
    if opts.device != "cuda":
        return
    if opts.executor == "inline" or not effective_address(opts):
        check_cuda_here()


def _context(plan: Plan, staging: Path, opts: ConvertOptions, faults: Faults | None) -> TaskContext:
    comp = plan.source.get("companions")
    return TaskContext(
        source=str(Path(plan.source["path"]).resolve()), format=plan.source["format"], staging=str(staging.resolve()),
        trust_pickle=opts.trust_pickle, device=opts.device, verify=opts.verify, faults=faults,
        companions=CompanionsRef(str(Path(comp["path"]).resolve()), comp["format"]) if comp else None,
    )


def _reuse(out: Path, plan: Plan, resume: bool) -> tuple[dict[str, dict[str, Any]], list[OutputFile]]:
    """Staged files an earlier run finished (``--resume``), and the files left to write."""
    results: dict[str, dict[str, Any]] = {}
    todo: list[OutputFile] = []
    for of in plan.files:
        done = staged_result(out, of) if resume else None
        if done is not None:
            results[of.name] = done
        else:
            todo.append(of)
    if results:
        log.info("resume: %d of %d files already written and verified; writing %d", len(results), len(plan.files),
                 len(todo))
    return results, todo


def execute(plan: Plan, out: Path, opts: ConvertOptions, *, faults: Faults | None = None,
            ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, float]]:
    """Run ``plan`` into ``out``; return outputs, executor info and timings.

    The caller writes the report (also on failure). ``faults`` is for tests only.
    """
    check_device(opts)
    drop_cached_sources()  # a source opened by an earlier run in this process may have changed since
    staging = out / STAGING
    staging.mkdir(exist_ok=True)
    for sub in {(staging / f.name).parent for f in plan.files}:  # files in subdirectories (adapter/)
        sub.mkdir(parents=True, exist_ok=True)
    address = effective_address(opts)
    kind, why = choose_executor(plan, opts.executor, opts.workers, address)
    results, todo = _reuse(out, plan, opts.resume)
    progress = Progress(sum(f.nbytes for f in todo), opts.progress,
                        already=sum(f.nbytes for f in plan.files if f.name in results))
    request = RunRequest(_context(plan, staging, opts, faults), todo, progress, opts.workers, address)
    t0 = time.perf_counter()
    try:
        executor = EXECUTORS["inline" if not todo else kind]
        for r in executor.run(request):
            results[r["name"]] = r
    finally:
        progress.close()
    t_write = time.perf_counter() - t0
    missing = [f.name for f in plan.files if f.name not in results]
    if missing:
        raise InternalError(f"{len(missing)} output files were not produced: {', '.join(missing[:5])}")
    t1 = time.perf_counter()
    outputs = finish(out, plan, results, get_layout())
    info = {"kind": kind, "why": why, "workers": opts.workers, "device": opts.device,
            "resumed_files": len(plan.files) - len(todo), "written_files": len(todo), **request.info}
    if kind == "ray":
        info["address"] = address or "local instance"
    return outputs, info, {"write": round(t_write, 4), "finish": round(time.perf_counter() - t1, 4)}
