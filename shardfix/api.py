"""The library's entry points: inspect, plan, convert. The CLI and job runner only call these."""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any

from shardfix.errors import ShardfixError
from shardfix.execute import execute, prepare_output
from shardfix.options import ConvertOptions
from shardfix.plan import Plan, build_plan
from shardfix.report import REPORT_NAME, build_report
from shardfix.safetensors_io import write_json_atomic
from shardfix.sources import open_source
from shardfix.sources.base import SourceIndex
from shardfix.target_sources import merge_targets

log = logging.getLogger(__name__)


def load_index(src: str | Path, opts: ConvertOptions | None = None) -> SourceIndex:
    """Open a checkpoint and return its metadata index (no tensor data read)."""
    trust = bool(opts and opts.trust_pickle)
    source = open_source(src, trust_pickle=trust)
    try:
        index = source.index
    finally:
        source.close()
    for note in pickle_warnings(index):
        log.warning("warning: %s", note)
    return index


def pickle_warnings(index: SourceIndex) -> list[str]:
    """Notes saying that full unpickling was used (--trust-pickle) or refused for some entries."""
    return [n for n in index.notes if n.startswith("--trust-pickle:") or "only full unpickling can read" in n]


def plan_conversion(src: str | Path, opts: ConvertOptions | None = None) -> Plan:
    """Plan converting ``src`` (metadata only)."""
    opts = opts or ConvertOptions()
    t0 = time.perf_counter()
    index = load_index(src, opts)
    companions = load_index(opts.companions) if opts.companions else None
    t1 = time.perf_counter()
    plan = build_plan(index, opts, merge_targets(opts), companions)
    plan.warnings.extend(pickle_warnings(index))
    plan.findings["timings"] = {"index": round(t1 - t0, 4), "plan": round(time.perf_counter() - t1, 4)}
    log.debug("indexed %s in %.2fs, planned in %.2fs", src, t1 - t0, time.perf_counter() - t1)
    return plan


def add_evidence(plan: Plan, src: str | Path, opts: ConvertOptions) -> None:
    """Read the few tensors evidence needs and record findings and warnings on the plan."""
    from shardfix.evidence import gather_evidence

    source = open_source(src, trust_pickle=opts.trust_pickle)
    try:
        findings, warnings = gather_evidence(plan, source)
    finally:
        source.close()
    plan.findings["evidence"] = findings
    plan.warnings.extend(warnings)


def convert(src: str | Path, out: str | Path, opts: ConvertOptions | None = None) -> dict[str, Any]:
    """Convert ``src`` into ``out``; return the report (also written to ``out``).

    On failure a report with ``status: "failed"`` is written (if the directory is ours) and
    the error is re-raised; model and optimizer files stay in the staging area, so the
    directory never looks complete.
    """
    opts = opts or ConvertOptions()
    out = Path(out)
    t0 = time.perf_counter()
    plan = plan_conversion(src, opts)
    add_evidence(plan, src, opts)
    t_plan = time.perf_counter() - t0
    prepare_output(out, overwrite=opts.overwrite, resume=opts.resume)
    (out / REPORT_NAME).unlink(missing_ok=True)
    try:
        outputs, executor, timings = execute(plan, out, opts)
    except BaseException as e:
        msg = str(e) if isinstance(e, ShardfixError) else f"{type(e).__name__}: {e}"
        if isinstance(e, KeyboardInterrupt):
            msg = "interrupted (Ctrl-C); rerun with --resume to finish"
        try:
            timings = {"plan": round(t_plan, 4), "total": round(time.perf_counter() - t0, 4)}
            report = build_report(plan, [], status="failed", timings=timings, executor={}, error=msg)
            if not isinstance(e, ShardfixError) and not isinstance(e, KeyboardInterrupt):
                report["traceback"] = traceback.format_exc()
            if out.is_dir():
                write_json_atomic(out / REPORT_NAME, report)
        except Exception:  # never mask the original error
            log.debug("could not write the failure report", exc_info=True)
        raise
    timings = {"plan": round(t_plan, 4), **timings, "total": round(time.perf_counter() - t0, 4)}
    report = build_report(plan, outputs, status="complete", timings=timings, executor=executor)
    write_json_atomic(out / REPORT_NAME, report)
    return report


__all__ = ["convert", "plan_conversion", "load_index", "add_evidence"]
