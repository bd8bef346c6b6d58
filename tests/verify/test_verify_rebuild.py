"""``verify --against`` rebuilds the plan from the source: an edited report (ops, sources,
checksums) cannot make a swapped or zeroed tensor pass."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import xxhash
from safetensors.torch import load_file, save_file

from shardfix.api import convert
from shardfix.options import ConvertOptions
from shardfix.report import REPORT_NAME
from shardfix.verify import verify_output


def _doctor(out: Path, tensors: dict[str, torch.Tensor], sources: dict[str, str], ops: dict[str, list]) -> None:
    """Rewrite model.safetensors and make every checksum, source and op in the report agree with it."""
    path = out / "model.safetensors"
    save_file(tensors, str(path))
    report = json.loads((out / REPORT_NAME).read_text())
    for f in report["outputs"]["files"]:
        if f["name"] != path.name:
            continue
        f["bytes"] = path.stat().st_size
        f["checksum"] = xxhash.xxh3_128_hexdigest(path.read_bytes())
        for t in f["tensors"]:
            t["checksum"] = xxhash.xxh3_64_hexdigest(tensors[t["name"]].contiguous().view(torch.uint8).numpy().tobytes())
            t["source"] = sources.get(t["name"], t["source"])
            t["ops"] = ops.get(t["name"], t["ops"])
    by_source: dict[str, list[str]] = {}
    for f in report["outputs"]["files"]:
        for t in f["tensors"]:
            by_source.setdefault(t["source"], []).append(t["name"])
    for e in report["ledger"]:  # the ledger edited to agree too
        e["outputs"] = by_source.get(e["source"], e["outputs"])
    (out / REPORT_NAME).write_text(json.dumps(report))


def test_edited_report_cannot_make_a_wrong_tensor_pass(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    sd = {"a.weight": torch.randn(8, 4, generator=g), "b.weight": torch.randn(8, 4, generator=g)}
    torch.save(sd, tmp_path / "model.pt")
    out = tmp_path / "out"
    convert(tmp_path / "model.pt", out, ConvertOptions(executor="inline", progress=False))
    assert verify_output(out, tmp_path / "model.pt")[0] == []
    written = load_file(str(out / "model.safetensors"))

    # swapped tensors, with the report's sources swapped to match
    _doctor(out, {"a.weight": written["b.weight"], "b.weight": written["a.weight"]},
            {"a.weight": "b.weight", "b.weight": "a.weight"}, {})
    assert verify_output(out)[0] == []  # the report alone agrees with the file ...
    problems = verify_output(out, tmp_path / "model.pt")[0]
    assert any("a.weight" in p and "differs" in p for p in problems), problems  # ... the source does not

    # a zeroed tensor whose report ops claim it was made as zeros
    _doctor(out, {"a.weight": torch.zeros(8, 4), "b.weight": written["b.weight"]},
            {"a.weight": "a.weight", "b.weight": "b.weight"},
            {"a.weight": [{"op": "value", "value": 0.0, "shape": [8, 4], "dtype": "F32"}]})
    problems = verify_output(out, tmp_path / "model.pt")[0]
    assert any("a.weight" in p for p in problems), problems
