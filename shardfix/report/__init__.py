"""``shardfix-report.json``: what was read, what was done to every entry, and what was written.

The report is written last; ``status`` is ``"complete"`` only when every planned file was
written and verified. A failed run leaves a report with ``status: "failed"`` and the error.
"""

from __future__ import annotations

import platform
from collections import Counter
from typing import Any

from shardfix.outputs.layout import REPORT_NAME  # noqa: F401 - re-exported
from shardfix.plan import Plan
from shardfix.version import __version__

SCHEMA_VERSION = 1


def build_report(
    plan: Plan,
    outputs: list[dict[str, Any]],
    *,
    status: str,
    timings: dict[str, float],
    executor: dict[str, Any],
    error: str | None = None,
    extra_warnings: list[str] | None = None,
) -> dict[str, Any]:
    """Assemble the report document (pure)."""
    written = sum(o["bytes"] for o in outputs)
    read = plan.source["bytes"]
    seconds = timings.get("total", 0.0) or 0.0
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "shardfix", "version": __version__, "python": platform.python_version()},
        "status": status,
        "source": plan.source,
        "options": plan.options,
        "executor": executor,
        "findings": plan.findings,
        "ledger": [e.to_dict() for e in plan.ledger],
        "ledger_summary": dict(Counter(e.fate for e in plan.ledger)),
        "outputs": {
            "files": outputs,
            "param_groups": plan.param_groups,
            # config.json, tokenizer files, adapter config ...: each with bytes and xxh3-128 (set once placed)
            "sidecars": [side.record() for side in plan.sidecars if side.checksum is not None],
        },
        "warnings": [*plan.warnings, *(extra_warnings or [])],
        "timings": timings,
        "throughput": {
            "bytes_written": written,
            "source_bytes": read,
            "seconds": round(seconds, 4),
            "written_gb_per_s": round(written / seconds / 1e9, 4) if seconds > 0 else None,
        },
    }
    if error:
        report["error"] = error
    return report


def summarize(report: dict[str, Any]) -> str:
    """A short human summary of a report."""
    src = report["source"]
    files = report["outputs"]["files"]
    lines = [
        f"status: {report['status']}, {len(report.get('warnings') or [])} warning(s)"
        + (f" ({report['error']})" if report.get("error") else ""),
        f"source: {src['path']} ({src['format']}, {len(src['files'])} files, {src['bytes']:,} bytes)",
        f"ledger: {sum(report['ledger_summary'].values())} source entries: "
        + ", ".join(f"{n} {k}" for k, n in sorted(report["ledger_summary"].items())),
    ]
    by_set: dict[str, list[dict[str, Any]]] = {}
    for f in files:
        by_set.setdefault(f["set"], []).append(f)
    for kind, fs in by_set.items():
        n = sum(len(f["tensors"]) for f in fs)
        lines.append(f"{kind}: {n} tensors in {len(fs)} file(s), {sum(f['bytes'] for f in fs):,} bytes")
    sides = report["outputs"].get("sidecars") or []
    if sides:
        lines.append("beside them: " + ", ".join(s["name"] for s in sides))
    for side in sides:
        for c in side.get("changes") or []:
            lines.append(f"  {side['name']}: {c['key']} {c['from']} -> {c['to']} (from {c['because']})")
    changed = [e for e in report["ledger"] if e["fate"] in ("reconciled", "split")]
    for e in changed[:12]:
        acts = [a for a in e["actions"] if a["action"] in ("trim", "grow", "split", "transpose")]
        desc = "; ".join(f"{a['action']} {a.get('rule', '')} {a.get('from', '')} -> {a.get('to', '')}" for a in acts)
        lines.append(f"  {e['fate']}: {e['source']} -> {', '.join(e['outputs'])}  {desc}")
    if len(changed) > 12:
        lines.append(f"  ... {len(changed) - 12} more reconciled entries")
    dropped = [e for e in report["ledger"] if e["fate"] == "dropped"]
    for e in dropped[:8]:
        lines.append(f"  dropped: {e['source']}: {e.get('reason', '')}")
    if len(dropped) > 8:
        lines.append(f"  ... {len(dropped) - 8} more dropped entries (see the ledger)")
    t = report["throughput"]
    ex = report.get("executor", {})
    lines.append(
        f"time: {t['seconds']:.2f} s on {ex.get('kind', '?')} executor"
        + (f" ({ex.get('workers')} workers)" if ex.get("workers") else "")
        + (f" [{ex['why']}]" if ex.get("why") else "")
        + (f", {t['written_gb_per_s']:.3f} GB/s written" if t.get("written_gb_per_s") else "")
    )
    return "\n".join(lines)  # the warnings themselves go to stderr (cli), counted on the status line
