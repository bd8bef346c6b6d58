"""Comparing finished output directories byte for byte (the report, which holds timings, and shardfix's
bookkeeping -- the manifest of its files, which lists the report's checksum, and the lock file -- aside)."""

from __future__ import annotations

import json
from pathlib import Path

from shardfix.outputs.manifest import INTERNAL_NAMES
from shardfix.report import REPORT_NAME


def output_bytes(out: Path) -> dict[str, bytes]:
    """Every file of a finished output except the report."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.is_file() and p.name != REPORT_NAME and p.name not in INTERNAL_NAMES}


def assert_same_output(out: Path, ref: dict[str, bytes]) -> None:
    got = output_bytes(out)
    assert sorted(got) == sorted(ref), f"files differ: {sorted(set(got) ^ set(ref))}"
    differing = [name for name in ref if got[name] != ref[name]]
    assert not differing, f"bytes differ in {differing}"
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["status"] == "complete"
