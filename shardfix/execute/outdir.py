"""The staging area during a run: reuse staged files (``--resume``) and finish it -- the layout's
index files and sidecars are written into staging next to the data files. Moving them into OUT,
the report last, is :meth:`shardfix.execute.session.OutputSession.publish`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from shardfix.outputs import SETS, STAGING, OutputLayout
from shardfix.outputs.layout import SetFiles, Sidecar
from shardfix.outputs.manifest import Manifest
from shardfix.outputs.writer import file_checksum
from shardfix.plan import OutputFile, Plan


def staged_result(out: Path, of: OutputFile) -> dict[str, Any] | None:
    """A staged file from an earlier run that still matches its fingerprint and checksum, or None.

    A file already moved into OUT counts only when the manifest proves shardfix wrote it.
    """
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
    manifest = Manifest.load(out)
    placed = manifest is not None and manifest.owns(of.name)
    for where in (staging / of.name, *([out / of.name] if placed else [])):
        if where.is_file() and not where.is_symlink() and file_checksum(where) == done.get("checksum"):
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
    """Write the layout's index files and sidecars into the staging area; return the outputs' records.

    Nothing appears in ``out`` here: every file waits in staging until the report can follow it.
    """
    staging = out / STAGING
    outputs = []
    for of in plan.files:
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
    layout.finish(staging, sets, _sidecars(plan, layout))
    return outputs
