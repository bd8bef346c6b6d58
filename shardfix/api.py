"""The library's entry points: inspect, plan, convert. The CLI and job runner only call these."""

from __future__ import annotations

import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any

from shardfix.errors import ShardfixError, StrictError
from shardfix.execute import Faults, check_device, check_ray_address, execute
from shardfix.execute.session import OutputSession, open_output
from shardfix.layouts import open_checkpoint
from shardfix.options import ConvertOptions
from shardfix.outputs import REPORT_NAME, get_layout
from shardfix.plan import Plan, build_plan
from shardfix.plan.hf_dir import hf_directory
from shardfix.plan.identity import stamp_source_identity
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


def _planned_names(plan: Plan) -> set[str]:
    """Every name this run will place in OUT: data files, index files, this plan's sidecars, the report.

    The layout's optimizer param-groups sidecar is counted when the plan writes optimizer state; other
    sidecars (config, tokenizer, adapter config) are in ``plan.sidecars`` once ``hf_directory`` ran.
    """
    layout = get_layout()
    groups = [n for n in layout.sidecar_names() if n.startswith("optimizer")] if plan.files_of("optimizer") else []
    names = {f.name for f in plan.files} | {s.name for s in plan.sidecars} | set(groups) | {REPORT_NAME}
    return names | {layout.index_name(s) for s in {f.set for f in plan.files}}


def _open_out(plan: Plan, src: str | Path, out: Path, opts: ConvertOptions) -> OutputSession:
    files = [*plan.source["files"], *([plan.source["companions"]["path"]] if plan.source.get("companions") else [])]
    session = open_output(out, src=Path(src), source_files=files, write_names=_planned_names(plan),
                          overwrite=opts.overwrite, resume=opts.resume, keep_foreign=opts.keep_foreign)
    if os.path.lexists(out / REPORT_NAME):
        session.remove_owned(REPORT_NAME)  # an earlier run's report no longer describes OUT
    return session


def _strict_error(plan: Plan) -> StrictError:
    n = len(plan.warnings)
    first = plan.warnings[0] if plan.warnings else ""
    return StrictError(f"--strict: {n} warning(s) treated as errors; nothing was written. First: {first}")


def convert(src: str | Path, out: str | Path, opts: ConvertOptions | None = None, *,
            faults: Faults | None = None) -> dict[str, Any]:
    """Convert ``src`` into ``out``; return the report (also written to ``out``).

    OUT is checked, locked and given a manifest first (:func:`shardfix.execute.session.open_output`).
    On failure a report with ``status: "failed"`` is written and the error re-raised; data files
    stay in the staging area, so the directory never looks complete. With ``--strict`` any warning
    fails the run (exit 3) before data is written.
    """
    opts = opts or ConvertOptions()
    out = Path(out)
    t0 = time.perf_counter()
    # opened once for the plan and the evidence
    source = open_checkpoint(src, trust_pickle=opts.trust_pickle, follow_symlinks=opts.follow_symlinks)
    try:
        plan = plan_conversion(src, opts, source=source)
        add_evidence(plan, source)
        hf_directory(plan, source, opts)
        stamp_source_identity(plan, source.index)
    finally:
        source.close()
    t_plan = time.perf_counter() - t0
    check_device(opts)  # before OUT is created: no GPU here is a usage error, not a failed run
    check_ray_address(opts)  # likewise a cluster that refuses us
    with _open_out(plan, src, out, opts) as session:
        try:
            if opts.strict and plan.warnings:
                raise _strict_error(plan)
            outputs, executor, timings = execute(plan, out, opts, faults=faults)
            timings = {"plan": round(t_plan, 4), **timings, "total": round(time.perf_counter() - t0, 4)}
            report = build_report(plan, outputs, status="complete", timings=timings, executor=executor)
            marker = {**report, "status": "incomplete",
                      "error": "files are being moved into place; if this stays, the run was interrupted: rerun "
                               "with --resume"}
            session.publish(report, marker, {o["name"]: (o["bytes"], o["checksum"]) for o in outputs})
        except BaseException as e:
            _failure_report(session, plan, e, t0, t_plan)
            raise
    return report


def _failure_report(session: OutputSession, plan: Plan, e: BaseException, t0: float, t_plan: float) -> None:
    msg = str(e) if isinstance(e, ShardfixError) else f"{type(e).__name__}: {e}"
    if isinstance(e, KeyboardInterrupt):
        msg = "interrupted (Ctrl-C); rerun with --resume to finish"
    try:
        timings = {"plan": round(t_plan, 4), "total": round(time.perf_counter() - t0, 4)}
        report = build_report(plan, [], status="failed", timings=timings, executor={}, error=msg)
        if not isinstance(e, (ShardfixError, KeyboardInterrupt)):
            report["traceback"] = traceback.format_exc()
        session.write_report(report)
    except Exception:  # never mask the original error
        log.debug("could not write the failure report", exc_info=True)


__all__ = ["convert", "plan_conversion", "load_index", "add_evidence", "inspect_source"]
