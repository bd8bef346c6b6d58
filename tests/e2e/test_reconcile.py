"""Reconcile padding: vocab to its true size, world-size padding, companions in lockstep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shardfix.api import convert
from shardfix.examples.fsdp_train import TinyLM, build_model
from shardfix.options import ConvertOptions
from tests.conftest import bits_equal, run_cli

VOCAB = 1000


def trimmed(name: str, t: torch.Tensor) -> torch.Tensor:
    """What the training process's tensor should become: the padded rows cut."""
    if name in ("embed.weight", "lm_head.weight"):
        return t[:VOCAB]
    if name == "scalars":
        return t[:5]
    return t


@pytest.fixture(scope="module")
def reconciled(fsdp_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("reconciled")
    shapes = tmp / "shapes.json"
    shapes.write_text(json.dumps({"scalars": [5]}))
    out = tmp / "out"
    r = run_cli("convert", fsdp_ckpt, out, "--vocab-size", VOCAB, "--target-shapes", shapes, "--executor", "inline")
    assert r.code == 0, r.err
    return out


def test_tensors_equal_training_tensors_sliced(reconciled: Path, reference: dict) -> None:
    model = load_file(reconciled / "model.safetensors")
    for name, want in reference["model"].items():
        assert bits_equal(model[name], trimmed(name, want)), name
    optim = load_file(reconciled / "optimizer.safetensors")
    for fqn, states in reference["optim"]["state"].items():
        for sname, want in states.items():
            expect = want if want.dim() == 0 else trimmed(fqn, want)
            assert bits_equal(optim[f"state.{fqn}.{sname}"], expect), (fqn, sname)


def test_ledger_records_each_trim(reconciled: Path) -> None:
    report = json.loads((reconciled / "shardfix-report.json").read_text())
    ledger = {e["source"]: e for e in report["ledger"]}
    for key, before, after, rule in [
        ("model.embed.weight", [1024, 32], [1000, 32], "vocab"),
        ("model.lm_head.weight", [1024, 32], [1000, 32], "vocab"),
        ("model.scalars", [6], [5], "world-size"),
        ("optim.state.embed.weight.exp_avg_sq", [1024, 32], [1000, 32], "vocab"),
        ("optim.state.scalars.exp_avg", [6], [5], "world-size"),
    ]:
        entry = ledger[key]
        assert entry["fate"] == "reconciled", key
        trims = [a for a in entry["actions"] if a["action"] == "trim"]
        assert len(trims) == 1 and trims[0]["from"] == before and trims[0]["to"] == after, key
        assert trims[0]["rule"].startswith(rule)
    assert ledger["optim.state.embed.weight.step"]["fate"] == "written"
    ev = report["findings"]["evidence"]
    assert ev["vocab_rows"][0]["likely_vocab_at_most"] == VOCAB
    assert ev["padding_vectors"][0]["trailing_ones"] == 1 and 2 in ev["padding_vectors"][0]["implied_world_sizes"]


def test_loads_strict_into_unpadded_model_with_identical_logits(reconciled: Path, reference: dict) -> None:
    padded = build_model(VOCAB, world_size=2)
    padded.load_state_dict(reference["model"], strict=True)
    torch.manual_seed(0)
    plain = TinyLM(vocab=VOCAB, world_size=2, pad_vocab=False, pad_scalars=False)
    plain.blocks[1].to(torch.bfloat16)
    plain.load_state_dict(load_file(reconciled / "model.safetensors"), strict=True)
    tokens = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = padded(tokens)[..., :VOCAB]
        got = plain(tokens)
    assert got.shape == want.shape
    assert torch.equal(got, want)


def test_mask_file_for_another_model(fsdp_ckpt: Path, reference: dict, tmp_path: Path) -> None:
    """Masks that fit are cut like their parameter; masks made for another model are skipped by name."""
    g = torch.Generator().manual_seed(3)
    masks = {
        "_orig_mod.embed.weight": (torch.rand(1024, 32, generator=g) > 0.5),
        "blocks.0.fc.weight": (torch.rand(128, 32, generator=g) > 0.5).to_sparse(),  # sparse COO
        "blocks.0.qkv.weight": torch.ones(48, 32, dtype=torch.bool),  # made for a smaller model
        "not_a_param.weight": torch.ones(3, dtype=torch.bool),
    }
    comp = tmp_path / "masks.pt"
    torch.save(masks, comp)
    out = tmp_path / "out"
    report = convert(fsdp_ckpt, out, ConvertOptions(vocab_size=VOCAB, companions=str(comp), executor="inline",
                                                     progress=False))
    got = load_file(out / "companions.safetensors")
    assert set(got) == {"embed.weight", "blocks.0.fc.weight"}
    assert bits_equal(got["embed.weight"], masks["_orig_mod.embed.weight"][:VOCAB])
    assert bits_equal(got["blocks.0.fc.weight"], masks["blocks.0.fc.weight"].to_dense())
    comp_ledger = {e["source"]: e for e in report["ledger"] if e.get("origin") == "companions"}
    assert set(comp_ledger) == set(masks)
    assert comp_ledger["blocks.0.qkv.weight"]["fate"] == "dropped"
    assert "[48, 32]" in comp_ledger["blocks.0.qkv.weight"]["reason"]
    assert comp_ledger["not_a_param.weight"]["fate"] == "dropped"
    assert any("blocks.0.qkv.weight" in w and "not_a_param.weight" in w for w in report["warnings"])
    assert report["status"] == "complete"


def test_conflicting_and_impossible_targets_list_every_problem(fsdp_ckpt: Path, tmp_path: Path) -> None:
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps({"embed.weight": [999, 32], "router.weight": [140, 32], "nope": [1]}))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"vocab_size": 1001, "hidden_size": 32}))
    out = tmp_path / "out"
    r = run_cli("convert", fsdp_ckpt, out, "--vocab-size", "1000", "--target-config", config)
    assert r.code == 2
    assert "--vocab-size 1000" in r.err and "1001" in r.err and "Traceback" not in r.err
    r = run_cli("convert", fsdp_ckpt, out, "--vocab-size", "1000", "--target-shapes", shapes)
    assert r.code == 2, r.err
    for needle in ("embed.weight", "[1000, 32]", "[999, 32]", "router.weight", "[140, 32]", "nope"):
        assert needle in r.err, needle
    assert "Traceback" not in r.err
    assert not (out / "model.safetensors").exists()


def test_skip_mismatched_drops_with_reason(fsdp_ckpt: Path, tmp_path: Path) -> None:
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps({"router.weight": [140, 32]}))
    report = convert(fsdp_ckpt, tmp_path / "out", ConvertOptions(target_shapes=str(shapes), skip_mismatched=True,
                                                                 executor="inline", progress=False))
    ledger = {e["source"]: e for e in report["ledger"]}
    assert ledger["model.router.weight"]["fate"] == "dropped"
    assert "[131, 32]" in ledger["model.router.weight"]["reason"]
    assert ledger["optim.state.router.weight.exp_avg"]["fate"] == "dropped"
    assert "router.weight" not in load_file(tmp_path / "out" / "model.safetensors")


def test_target_model_on_meta_device(fsdp_ckpt: Path, tmp_path: Path, reference: dict) -> None:
    """--target-model builds the unpadded model on the meta device; its shapes drive the trims."""
    mod = tmp_path / "target_mod.py"
    mod.write_text(
        "import torch\nfrom shardfix.examples.fsdp_train import TinyLM\n"
        "def build():\n    return TinyLM(vocab=1000, world_size=2, pad_vocab=False, pad_scalars=False)\n"
    )
    r = run_cli("convert", fsdp_ckpt, tmp_path / "out", "--target-model", "target_mod:build", "--executor", "inline",
                env={"PYTHONPATH": f"{tmp_path}:{Path(__file__).resolve().parents[2]}"})
    assert r.code == 0, r.err
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert got["embed.weight"].shape == (1000, 32) and got["scalars"].shape == (5,)
    assert bits_equal(got["lm_head.weight"], reference["model"]["lm_head.weight"][:1000])


def test_allow_grow_adds_rows_and_fresh_moments(fsdp_ckpt: Path, reference: dict, tmp_path: Path) -> None:
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps({"embed.weight": [1030, 32], "lm_head.weight": [1030, 32]}))
    out = tmp_path / "out"
    r = run_cli("convert", fsdp_ckpt, out, "--vocab-size", "1030", "--executor", "inline")
    assert r.code == 2 and "--allow-grow" in r.err
    report = convert(fsdp_ckpt, out, ConvertOptions(vocab_size=1030, allow_grow=True, executor="inline", progress=False))
    model = load_file(out / "model.safetensors")
    emb = reference["model"]["embed.weight"]
    assert bits_equal(model["embed.weight"][:1024], emb)
    assert torch.equal(model["embed.weight"][1024], emb.mean(0))
    optim = load_file(out / "optimizer.safetensors")
    sq = optim["state.embed.weight.exp_avg_sq"]
    assert sq.shape == (1030, 32) and not sq[1024:].any()
    assert bits_equal(sq[:1024], reference["optim"]["state"]["embed.weight"]["exp_avg_sq"])
    grows = [a for a in {e["source"]: e for e in report["ledger"]}["model.embed.weight"]["actions"] if a["action"] == "grow"]
    assert grows and grows[0]["init"] == "mean"


def test_only_the_head_padded(tmp_path: Path) -> None:
    """Embedding 1000 rows, head 1024 (an older modded-nanogpt layout): --vocab-size trims the head only."""
    g = torch.Generator().manual_seed(1)
    sd = {"_orig_mod.embed.weight": torch.randn(1000, 8, generator=g),
          "_orig_mod.lm_head.weight": torch.randn(1024, 8, generator=g)}
    torch.save({"model": sd}, tmp_path / "ckpt.pt")
    report = convert(tmp_path / "ckpt.pt", tmp_path / "out", ConvertOptions(vocab_size=1000, executor="inline",
                                                                            progress=False))
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert bits_equal(got["embed.weight"], sd["_orig_mod.embed.weight"])
    assert bits_equal(got["lm_head.weight"], sd["_orig_mod.lm_head.weight"][:1000])
    head = {e["source"]: e for e in report["ledger"]}["model._orig_mod.lm_head.weight"]
    assert [a["rule"] for a in head["actions"] if a["action"] == "trim"] == ["vocab"]
