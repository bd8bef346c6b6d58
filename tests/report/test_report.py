"""The report document and its summary, built from a plan without running anything."""

from __future__ import annotations

import json
from pathlib import Path

from shardfix.options import ConvertOptions
from shardfix.plan import build_plan
from shardfix.report import build_report, summarize
from shardfix.sources.base import ObjectEntry, SourceIndex, TensorEntry


def _plan():
    index = SourceIndex(Path("/ckpt"), "test", [Path("/ckpt/f")], 2000, [
        TensorEntry("model.w", ("model", "w"), "F32", (4, 4)),
        ObjectEntry("epoch", ("epoch",), 3, "int"),
    ])
    return build_plan(index, ConvertOptions())


def test_report_is_strict_json_with_the_ledger_and_status() -> None:
    plan = _plan()
    outputs = [{"name": "model.safetensors", "bytes": 64, "checksum": "00", "tensors": []}]
    report = build_report(plan, outputs, status="complete", timings={"total": 0.5}, executor={"kind": "inline"})
    text = json.dumps(report, allow_nan=False)  # strict JSON: no NaN or Infinity anywhere
    again = json.loads(text)
    assert again["status"] == "complete" and again["schema_version"]
    assert [e["source"] for e in again["ledger"]] == ["model.w", "epoch"]
    assert again["ledger_summary"] == {"written": 1, "dropped": 1}
    assert again["tool"]["name"] == "shardfix"


def test_failed_report_says_so_in_the_summary() -> None:
    report = build_report(_plan(), [], status="failed", timings={}, executor={"kind": "inline"}, error="disk full")
    assert report["status"] == "failed" and report["error"] == "disk full"
    assert "failed" in summarize(report)
