"""The spine: a real FSDP2 checkpoint converts exactly, inline and on Ray, into loadable safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from shardfix.api import convert
from shardfix.examples.fsdp_train import build_model
from shardfix.options import ConvertOptions
from shardfix.sources import open_source
from tests.conftest import bits_equal, run_cli


def load_dir(out: Path, prefix: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob(f"{prefix}*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def files_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def inline_out(fsdp_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inline") / "out"
    convert(fsdp_ckpt, out, ConvertOptions(executor="inline", progress=False))
    return out


def test_fixture_is_really_sharded(fsdp_ckpt: Path) -> None:
    index = open_source(fsdp_ckpt).index
    by_key = {e.key: e for e in index.tensors()}
    router = by_key["model.router.weight"]
    assert sorted(c.sizes[0] for c in router.chunks) == [65, 66]  # uneven FSDP2 rows
    gate = by_key["model.gate"]
    assert sorted(c.sizes[0] for c in gate.chunks) == [0, 1]  # a 0-size chunk
    assert {e.dtype for e in index.tensors()} >= {"BF16", "F32"}
    assert "model.pos_scale" in by_key  # a buffer
    assert len(list(fsdp_ckpt.glob("*.distcp"))) == 2


def test_every_tensor_equals_training_process(inline_out: Path, reference: dict) -> None:
    model = load_dir(inline_out, "model")
    assert set(model) == set(reference["model"])
    for name, want in reference["model"].items():
        assert bits_equal(model[name], want), name
    optim = load_dir(inline_out, "optimizer")
    n = 0
    for fqn, states in reference["optim"]["state"].items():
        for sname, want in states.items():
            got = optim[f"state.{fqn}.{sname}"]
            assert bits_equal(got, want), (fqn, sname)
            n += 1
    assert n == len(optim) and n > 0
    assert optim["state.embed.weight.step"].dim() == 0


def test_output_loads_strict_into_unsharded_model(inline_out: Path) -> None:
    model = build_model(vocab=1000, world_size=2)
    result = model.load_state_dict(load_dir(inline_out, "model"), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_ledger_accounts_for_every_source_key(inline_out: Path, fsdp_ckpt: Path) -> None:
    report = json.loads((inline_out / "shardfix-report.json").read_text())
    assert report["status"] == "complete"
    keys = [e.key for e in open_source(fsdp_ckpt).index.entries]
    ledger = {e["source"]: e for e in report["ledger"]}
    assert sorted(ledger) == sorted(keys)
    assert ledger["model.embed.weight"]["outputs"] == ["embed.weight"]
    assert ledger["model.embed.weight"]["actions"][0]["action"] == "rename"
    assert ledger["optim.param_groups.0.lr"]["fate"] == "recorded"
    groups = json.loads((inline_out / "optimizer_param_groups.json").read_text())["param_groups"]
    assert groups[0]["lr"] == 1e-2 and "embed.weight" in groups[0]["params"]
    written = {t["name"] for f in report["outputs"]["files"] for t in f["tensors"]}
    produced = {o for e in report["ledger"] for o in e["outputs"]}
    assert written <= produced  # every written tensor is some source entry's output


@pytest.mark.slow
def test_ray_executor_is_byte_identical(ray_session, inline_out: Path, fsdp_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "ray"
    report = convert(fsdp_ckpt, out, ConvertOptions(executor="ray", workers=2, progress=False))
    assert report["executor"]["kind"] == "ray"
    assert files_bytes(out) == files_bytes(inline_out)


def test_tiny_max_shard_size_writes_several_files_and_a_correct_index(
    fsdp_ckpt: Path, reference: dict, tmp_path: Path
) -> None:
    out = tmp_path / "sharded"
    convert(fsdp_ckpt, out, ConvertOptions(executor="inline", max_shard_size="64KB", progress=False))
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(reference["model"])
    total = 0
    for name, fname in index["weight_map"].items():
        with safe_open(str(out / fname), framework="pt") as f:
            assert name in f.keys()
            t = f.get_tensor(name)
            total += t.numel() * t.element_size()
            assert bits_equal(t, reference["model"][name])
    assert index["metadata"]["total_size"] == total
    for shard in shards:
        assert shard.stat().st_size <= 64_000 or len(safe_open(str(shard), framework="pt").keys()) == 1
    assert (out / "optimizer.safetensors.index.json").is_file()
    assert not (out / "model.safetensors").exists()


@pytest.mark.slow
def test_cli_convert_and_verify(fsdp_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    r = run_cli("convert", fsdp_ckpt, out, "--executor", "inline", "--no-progress")
    assert r.code == 0, r.err
    assert "status: complete" in r.out
    r = run_cli("verify", out, "--against", fsdp_ckpt)
    assert r.code == 0, r.out + r.err
    assert "OK" in r.out


def test_plan_reads_no_tensor_data(fsdp_ckpt: Path, tmp_path: Path) -> None:
    """`plan` works on a checkpoint whose .distcp tensor bytes are all zeroed: it reads metadata only."""
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(fsdp_ckpt, copy)
    index = open_source(copy).index
    # zero every tensor record but keep bytes entries (param groups) intact
    for e in index.tensors():
        for c in e.chunks:
            if c.file and c.length:
                with open(copy / c.file, "r+b") as f:
                    f.seek(c.byte_offset)
                    f.write(b"\0" * c.length)
    r = run_cli("plan", copy, "--vocab-size", "1000", "--json")
    assert r.code == 0, r.err
    plan = json.loads(r.out)
    assert {t["name"] for f in plan["files"] for t in f["tensors"]} >= {"embed.weight", "state.embed.weight.exp_avg"}
