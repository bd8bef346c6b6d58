"""The output directory during a run: create or check it, reuse staged files (``--resume``), and
finish it -- stage the sidecars (only now: every data file is done), refuse to replace a file
shardfix did not write, move staged data files into place, then the layout's index files and
sidecars. The report is written by the caller, last.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from shardfix.errors import OutputError
from shardfix.outputs import REPORT_NAME, SETS, STAGING, OutputLayout
from shardfix.outputs.layout import SetFiles, Sidecar
from shardfix.outputs.sidecars import check_placeable, stage
from shardfix.outputs.writer import file_checksum
from shardfix.plan import OutputFile, Plan


def _is_ours(out: Path) -> bool:
    names = {p.name for p in out.iterdir()}
    return not names or REPORT_NAME in names or STAGING in names


def prepare_output(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Create ``out`` or check it may be used; ``--overwrite`` clears a previous shardfix output."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory; pick another output path")
    if out.is_dir() and any(out.iterdir()):
        if resume:
            return
        if not overwrite:
            raise OutputError(
                f"{out}: already exists and is not empty; pass --overwrite to replace it or --resume to "
                "finish an interrupted conversion"
            )
        if not _is_ours(out):
            raise OutputError(
                f"{out}: holds files shardfix did not write (no {REPORT_NAME}); refusing to delete them "
                "with --overwrite -- pick an empty or new directory"
            )
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create ({e.strerror})") from e


def staged_result(out: Path, of: OutputFile) -> dict[str, Any] | None:
    """A staged file from an earlier run that still matches its plan and checksum, or None."""
    staging = out / STAGING
    sidecar = staging / f"{of.name}.done.json"
    if not sidecar.is_file():
        return None
    try:
        done = json.loads(sidecar.read_text())
    except ValueError:
        return None
    if done.get("fingerprint") != of.fingerprint():
        return None
    for where in (staging / of.name, out / of.name):
        if where.is_file() and file_checksum(where) == done.get("checksum"):
            if where.parent != staging:
                os.replace(where, staging / of.name)
            return dict(done)
    return None


def _sidecars(plan: Plan, layout: OutputLayout) -> list[Sidecar]:
    """The plan's sidecars (model directory files), plus the optimizer's param groups when it has state."""
    make = getattr(layout, "param_groups_sidecar", None)
    groups = make(plan.param_groups) if plan.param_groups is not None and plan.files_of("optimizer") and make else None
    out = [s for s in plan.sidecars if groups is None or s.name != groups.name]  # a resumed finish adds it once
    if groups is not None:
        out.append(groups)
    plan.sidecars[:] = out  # the report lists them, with the checksums staging records
    return out


def finish(out: Path, plan: Plan, results: dict[str, dict[str, Any]], layout: OutputLayout) -> list[dict[str, Any]]:
    """Move staged files into place and write index files and sidecars (not the report)."""
    staging = out / STAGING
    sidecars = _sidecars(plan, layout)
    for side in sidecars:
        stage(staging, side)
    check_placeable(out, sidecars)
    outputs = []
    for of in plan.files:
        (out / of.name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / of.name, out / of.name)
        done = {k: v for k, v in results[of.name].items() if k != "fingerprint"}
        planned = {t.name: t for t in of.tensors}
        for t in done["tensors"]:
            t["source"] = planned[t["name"]].source
            t["ops"] = planned[t["name"]].ops
        outputs.append(done)
    sets = []
    for kind in SETS:
        fs = plan.files_of(kind)
        if fs:
            sets.append(SetFiles(kind, [f.name for f in fs], {t.name: f.name for f in fs for t in f.tensors},
                                 sum(t.nbytes for f in fs for t in f.tensors)))
    layout.finish(out, sets, sidecars)
    shutil.rmtree(staging, ignore_errors=True)
    return outputs
