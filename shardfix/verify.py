"""``shardfix verify``: re-read every output tensor and check it against the report and index.

With ``--against SRC`` each tensor is also recomputed from the source by applying the ops the
report's ledger recorded, and compared bit for bit. Every problem is listed; none is fatal to
the check itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import xxhash
from safetensors import safe_open

from shardfix.errors import BadInputError
from shardfix.report import REPORT_NAME
from shardfix.safetensors_io import file_checksum, tensor_bytes
from shardfix.sources.safetensors_src import read_header


def verify_output(out: str | Path, against: str | Path | None = None) -> tuple[list[str], dict[str, Any]]:
    """Return (problems, stats) for the output directory ``out``."""
    out = Path(out)
    report_path = out / REPORT_NAME
    if not report_path.is_file():
        raise BadInputError(f"{out}: no {REPORT_NAME}; not a finished shardfix output (rerun convert)")
    try:
        report = json.loads(report_path.read_text())
    except ValueError as e:
        raise BadInputError(f"{report_path}: not valid JSON ({e})") from e
    problems: list[str] = []
    stats = {"files": 0, "tensors": 0, "bytes": 0}
    if report.get("status") != "complete":
        problems.append(f"{report_path}: status is {report.get('status')!r}, not 'complete'")
    planned = {f["name"]: f for f in report["outputs"]["files"]}
    for kind in ("model", "optimizer", "companions"):
        idx = out / f"{kind}.safetensors.index.json"
        if idx.is_file():
            data = json.loads(idx.read_text())
            for name, fname in data.get("weight_map", {}).items():
                f = planned.get(fname)
                if f is None or not any(t["name"] == name for t in f["tensors"]):
                    problems.append(f"{idx.name}: maps {name} to {fname}, which the report does not list for it")
            total = sum(t_bytes(t) for f in planned.values() if f["set"] == kind for t in f["tensors"])
            if data.get("metadata", {}).get("total_size") != total:
                problems.append(f"{idx.name}: total_size {data.get('metadata', {}).get('total_size')} != {total}")
    sources: Any = None
    if against is not None:
        from shardfix.sources import open_source

        sources = (open_source(against, trust_pickle=bool(report["options"].get("trust_pickle"))), report)
    for fname, f in planned.items():
        path = out / fname
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        stats["files"] += 1
        try:
            header = read_header(path)
        except Exception as e:
            problems.append(f"{path}: {e}")
            continue
        if file_checksum(path) != f["checksum"]:
            problems.append(f"{path}: file checksum differs from the report (the file changed after it was written)")
        names = [k for k in header if not k.startswith("__")]
        expected = [t["name"] for t in f["tensors"]]
        if sorted(names) != sorted(expected):
            problems.append(f"{path}: holds {len(names)} tensors, the report lists {len(expected)}")
        with safe_open(str(path), framework="pt") as h:
            for t in f["tensors"]:
                name = t["name"]
                if name not in header:
                    problems.append(f"{path}: tensor {name} missing")
                    continue
                info = header[name]
                if info["dtype"] != t["dtype"] or info["shape"] != t["shape"]:
                    problems.append(f"{path}: {name} is {info['dtype']} {info['shape']}, report says "
                                    f"{t['dtype']} {t['shape']}")
                    continue
                value = h.get_tensor(name)
                digest = xxhash.xxh3_64_hexdigest(tensor_bytes(value.contiguous()))
                stats["tensors"] += 1
                stats["bytes"] += value.numel() * value.element_size()
                if digest != t["checksum"]:
                    problems.append(f"{path}: tensor {name} checksum {digest} != report {t['checksum']} "
                                    "(its bytes changed)")
                if sources is not None:
                    problems += _compare_with_source(sources, name, value)
    return problems, stats


def t_bytes(t: dict[str, Any]) -> int:
    from shardfix.dtypes import itemsize, numel

    return numel(t["shape"]) * itemsize(t["dtype"])


def _compare_with_source(sources: Any, name: str, value: Any) -> list[str]:
    import torch

    from shardfix.reconcile.ops import apply_ops

    src, report = sources
    cache = report.setdefault("_ops", None)
    if cache is None:
        cache = report["_ops"] = _ops_by_output(report)
    item = cache.get(name)
    if item is None:
        return [f"{name}: no ledger entry produced it"]
    source_key, ops = item
    base = None if ops and ops[0]["op"] == "value" else src.read_tensor(source_key)
    expect = apply_ops(base, ops)
    if expect.dtype != value.dtype or tuple(expect.shape) != tuple(value.shape) or not torch.equal(
        expect.reshape(-1).view(torch.uint8) if expect.numel() else expect,
        value.reshape(-1).view(torch.uint8) if value.numel() else value,
    ):
        return [f"{name}: differs from {source_key} in the source after the recorded actions"]
    return []


def _ops_by_output(report: dict[str, Any]) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    out = {}
    for f in report["outputs"]["files"]:
        for t in f["tensors"]:
            out[t["name"]] = (t["source"], t.get("ops", []))
    return out
