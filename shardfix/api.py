"""The library's entry points: inspect, plan, convert. The CLI and job runner only call these."""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any

from shardfix.errors import ShardfixError
from shardfix.execute import Faults, check_device, execute, prepare_output
from shardfix.layouts import open_checkpoint
from shardfix.options import ConvertOptions
from shardfix.outputs import REPORT_NAME
from shardfix.outputs.writer import write_json_atomic
from shardfix.plan import Plan, build_plan
from shardfix.report import build_report
from shardfix.sources.base import Source, SourceIndex
from shardfix.targets.files import merge_targets

log = logging.getLogger(__name__)


def load_index(src: str | Path, opts: ConvertOptions | None = None) -> SourceIndex:
    """Open a checkpoint and return its metadata index (no tensor data read)."""
    source = open_checkpoint(src, trust_pickle=bool(opts and opts.trust_pickle),
                             follow_symlinks=bool(opts and opts.follow_symlinks))
    try:
        return _logged_index(source)
    finally:
        source.close()


def _logged_index(source: Source) -> SourceIndex:
    for note in pickle_warnings(source.index):
        log.warning("warning: %s", note)
    return source.index


def pickle_warnings(index: SourceIndex) -> list[str]:
    """Notes saying that full unpickling was used (--trust-pickle) or refused for some entries."""
    return [n for n in index.notes if n.startswith("--trust-pickle:") or "only full unpickling can read" in n]


def plan_conversion(src: str | Path, opts: ConvertOptions | None = None, *, source: Source | None = None) -> Plan:
    """Plan converting ``src`` (metadata only); ``source`` is ``src`` already opened, if it is."""
    opts = opts or ConvertOptions()
    t0 = time.perf_counter()
    index = _logged_index(source) if source is not None else load_index(src, opts)
    companions = load_index(opts.companions) if opts.companions else None
    t1 = time.perf_counter()
    plan = build_plan(index, opts, merge_targets(opts), companions)
    plan.warnings.extend(pickle_warnings(index))
    plan.findings["timings"] = {"index": round(t1 - t0, 4), "plan": round(time.perf_counter() - t1, 4)}
    log.debug("indexed %s in %.2fs, planned in %.2fs", src, t1 - t0, time.perf_counter() - t1)
    return plan


def add_evidence(plan: Plan, source: Source) -> None:
    """Read the few tensors evidence needs from the opened ``source``; record them on the plan."""
    from shardfix.plan.evidence import gather_evidence

    findings, warnings = gather_evidence(plan, source)
    plan.findings["evidence"] = findings
    plan.warnings.extend(warnings)


def inspect_source(src: str | Path, opts: ConvertOptions | None = None, *, profile: str | None = None,
                   target_config: str | None = None, evidence: bool = True) -> dict[str, Any]:
    """Describe a checkpoint (``shardfix inspect``), opening it once; with ``evidence`` also read
    the few tensors that show trained vocab rows and world-size padding."""
    from shardfix.inspect import add_evidence_lines, inspect_index

    opts = opts or ConvertOptions()
    source = open_checkpoint(src, trust_pickle=opts.trust_pickle, follow_symlinks=opts.follow_symlinks)
    try:
        index = _logged_index(source)
        info = inspect_index(index, profile, target_config)
        if evidence:
            plan = build_plan(index, opts)
            add_evidence(plan, source)
            add_evidence_lines(info, plan.findings["evidence"])
    finally:
        source.close()
    return info


def convert(src: str | Path, out: str | Path, opts: ConvertOptions | None = None, *,
            faults: Faults | None = None) -> dict[str, Any]:
    """Convert ``src`` into ``out``; return the report (also written to ``out``).

    On failure a report with ``status: "failed"`` is written (if the directory is ours) and
    the error is re-raised; model and optimizer files stay in the staging area, so the
    directory never looks complete.
    """
    opts = opts or ConvertOptions()
    out = Path(out)
    t0 = time.perf_counter()
    # opened once for the plan and the evidence
    source = open_checkpoint(src, trust_pickle=opts.trust_pickle, follow_symlinks=opts.follow_symlinks)
    try:
        plan = plan_conversion(src, opts, source=source)
        add_evidence(plan, source)
    finally:
        source.close()
    t_plan = time.perf_counter() - t0
    check_device(opts)  # before OUT is created: no GPU here is a usage error, not a failed run
    prepare_output(out, overwrite=opts.overwrite, resume=opts.resume)
    (out / REPORT_NAME).unlink(missing_ok=True)
    try:
        outputs, executor, timings = execute(plan, out, opts, faults=faults)
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


__all__ = ["convert", "plan_conversion", "load_index", "add_evidence", "inspect_source"]
