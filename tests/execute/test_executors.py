"""Executors through their registry, on a real (tiny) torch.save checkpoint; fault injection
through the task context (no environment variables)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shardfix.api import convert, plan_conversion
from shardfix.execute import EXECUTORS, Faults
from shardfix.execute.base import Executor
from shardfix.options import ConvertOptions


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = {"a.weight": torch.randn(16, 8), "b.weight": torch.randn(8, 8, dtype=torch.bfloat16)}
    path = tmp_path / "tiny.pt"
    torch.save({"model": model}, path)
    return path, model


def test_registry_holds_inline_and_ray_behind_one_protocol() -> None:
    assert set(EXECUTORS) == {"inline", "ray"}
    for name, ex in EXECUTORS.items():
        assert ex.name == name and callable(ex.run)
        assert set(Executor.__annotations__) <= set(type(ex).__dict__) | set(vars(ex))  # the Protocol's attributes


def test_inline_executor_writes_every_tensor_bit_exact(tiny, tmp_path: Path) -> None:
    path, model = tiny
    report = convert(path, tmp_path / "out", ConvertOptions(executor="inline", progress=False, max_shard_size="600B"))
    assert report["status"] == "complete" and report["executor"]["kind"] == "inline"
    got: dict[str, torch.Tensor] = {}
    for f in sorted((tmp_path / "out").glob("model*.safetensors")):
        got.update(load_file(f))
    assert set(got) == set(model)
    for k, v in model.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k].view(torch.uint8), v.view(torch.uint8))
    assert {e["source"] for e in report["ledger"]} == {"model.a.weight", "model.b.weight"}


def test_faults_travel_in_the_context_and_fail_the_run_cleanly(tiny, tmp_path: Path) -> None:
    path, _ = tiny
    fail = tmp_path / "fail"
    fail.mkdir()
    with pytest.raises(OSError) as e:
        convert(path, tmp_path / "out", ConvertOptions(executor="inline", progress=False), faults=Faults(fail_once_dir=str(fail)))
    assert e.value.errno == errno.EIO and list(fail.glob("*.failed"))
    assert not list((tmp_path / "out").glob("*.safetensors")), "a failed run leaves no data file in OUT"
    # the fault fires once per file: a resumed run completes
    report = convert(path, tmp_path / "out", ConvertOptions(executor="inline", progress=False, resume=True))
    assert report["status"] == "complete"


def test_plan_conversion_reads_no_tensor_data(tiny) -> None:
    path, _ = tiny
    plan = plan_conversion(path, ConvertOptions())
    assert [t.name for f in plan.files for t in f.tensors] == ["a.weight", "b.weight"]
