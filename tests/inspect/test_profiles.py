"""Profiles: each modded-nanogpt layout in docs/formats/core.md is identified from names and shapes, and
``shardfix inspect`` reports what decided it and the architecture it implies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shardfix.api import load_index
from shardfix.examples.nanogpt import VARIANTS, default_geometry, make_checkpoint, scalars_length
from shardfix.inspect import inspect_index
from shardfix.inspect.profiles import PROFILES, detect_profile
from tests.conftest import run_cli
from tests.hf_checkpoint import hf_dir

EXPECTED_PROFILE = {
    "small-qkv": "nanogpt-qkv",
    "qkvo-4hd": "nanogpt-qkvo", "qkvo-h4d": "nanogpt-qkvo", "qkvo-4dh": "nanogpt-qkvo",
    "medium": "nanogpt-medium", "medium-head-t": "nanogpt-medium",
    "banks": "nanogpt-banks", "banks-qk-vo": "nanogpt-banks",
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    for variant in VARIANTS:
        make_checkpoint(root / f"{variant}.pt", variant)
    return {v: root / f"{v}.pt" for v in VARIANTS}


def test_registry_has_one_module_per_layout() -> None:
    assert set(EXPECTED_PROFILE.values()) | {"hf", "generic", "megatron"} == set(PROFILES)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_inspect_identifies_each_variant(ckpts: dict[str, Path], variant: str) -> None:
    g = default_geometry(variant)
    info = inspect_index(load_index(ckpts[variant]))
    p = info["profile"]
    assert (p["name"], p["variant"], p["chosen_by"]) == (EXPECTED_PROFILE[variant], variant, "detection")
    assert p["evidence"] and any("_orig_mod." in r for r in p["evidence"])
    a = info["architecture"]
    assert (a["layers"], a["model_dim"], a["hdim"], a["mlp_hidden"]) == (g.layers, g.dim, g.hdim, g.hidden)
    assert a["vocab"]["padded"] == g.padded_vocab
    if variant == "small-qkv":  # embed has the true vocab, lm_head is padded
        assert a["vocab"]["likely"] == g.vocab and "embed.weight" in a["vocab"]["why"]
    heads = a["heads"]
    assert heads.get("heads") == g.heads or {"heads": g.heads, "head_dim": g.head_dim} in heads["candidates"]
    content, padded = scalars_length(variant, g)
    if content:
        s = info["scalars"]
        assert s["length"] == padded
        fit = [c for c in s["candidates"] if c["content"] == content]
        assert fit and (fit[0]["world_sizes"] == "any" or g.world_size in fit[0]["world_sizes"])
    fused = {f["name"]: f for f in info["fused"]}
    assert fused and all(f.get("outputs") for f in fused.values())
    if variant.startswith(("qkvo", "medium")):
        assert fused["blocks.0.attn.qkvo_w"]["outputs"][3] == "blocks.0.attn.c_proj.weight"
    if variant.startswith("qkvo"):
        assert fused["blocks.0.mlp.c_fc"]["kind"] == "transposed" and "blocks.0.mlp.c_proj" not in fused
    if variant.startswith("banks"):
        assert fused["mlp_bank"]["dropped"] and fused["lm_head.weight"]["kind"] == "transposed"
        assert info["optimizer_layout"] == []
    else:
        layout = info["optimizer_layout"]
        assert [o["container"] for o in layout] == ["optimizers.0", "optimizers.1"]
        assert layout[0]["keyed_by"] == "integer ids" and not layout[0]["param_names_recorded"]
        assert set(layout[1]["states"]) == {"momentum_buffer"}
    assert info["dtypes"] == {"F32": info["counts"]["tensors"]} and info["tensor_bytes"] > 0


def test_inspect_cli_human_table_and_json(ckpts: dict[str, Path]) -> None:
    r = run_cli("inspect", ckpts["qkvo-h4d"], "--no-evidence")
    assert r.code == 0, r.err
    for needle in ("profile: nanogpt-qkvo / qkvo-h4d (by detection)", "evidence: 2 x blocks.{i}.attn.qkvo_w",
                   "architecture: 2 layers, model dim 64", "scalars: [16]", "5L = 10 + 6 padding (world size 8, 16)",
                   "fused: blocks.0.attn.qkvo_w [64, 256] ->", "transposed: blocks.0.mlp.c_fc [64, 256]",
                   "optimizer: optimizers.1:"):
        assert needle in r.out, needle
    r = run_cli("inspect", ckpts["banks"], "--json", "--no-evidence")
    assert r.code == 0, r.err
    info = json.loads(r.out)
    assert info["profile"]["variant"] == "banks"
    assert any("slot(s) 3 are padding" in e for e in info["profile"]["evidence"])


def test_profile_override(ckpts: dict[str, Path]) -> None:
    index = load_index(ckpts["small-qkv"])
    det = detect_profile(index, "generic")
    assert det.profile.name == "generic" and det.chosen_by == "--profile"
    assert any(e.profile == "nanogpt-qkv" for e in det.others)
    r = run_cli("plan", ckpts["small-qkv"], "--split-fused", "--profile", "generic", "--json")
    assert r.code == 0, r.err
    names = {t["name"] for f in json.loads(r.out)["files"] for t in f["tensors"]}
    assert "blocks.0.attn.qkv_w" in names and "blocks.0.attn.c_q.weight" not in names
    r = run_cli("inspect", ckpts["small-qkv"], "--profile", "nanogpt-typo", "--no-evidence")
    assert r.code == 2 and "nanogpt-typo" in r.err and "nanogpt-banks" in r.err and "Traceback" not in r.err


def test_detection_reads_shapes_not_the_training_metadata(tmp_path: Path) -> None:
    """The same tensors saved with another step, script text and no optimizer: same verdict."""
    sd = make_checkpoint(tmp_path / "a.pt", "qkvo-4dh")
    torch.save({"step": 99999, "code": "# 2031-01-01 script", "model": {f"_orig_mod.{k}": v for k, v in sd.items()}},
               tmp_path / "b.pt")
    a, b = (detect_profile(load_index(tmp_path / f"{n}.pt")) for n in "ab")
    assert (a.profile.name, a.evidence.variant) == (b.profile.name, b.evidence.variant) == ("nanogpt-qkvo", "qkvo-4dh")


def test_hf_profile_with_config_beside_the_checkpoint(tmp_path: Path) -> None:
    info = inspect_index(load_index(hf_dir(tmp_path / "hf")))
    assert (info["profile"]["name"], info["profile"]["variant"]) == ("hf", "separate-qkvo")
    assert any("grouped-query" in r for r in info["profile"]["evidence"])
    h = info["architecture"]["heads"]
    assert (h["heads"], h["kv_heads"], h["head_dim"]) == (4, 2, 16) and "config.json" in h["source"]
    assert info["fused"] == []


def test_hf_fused_qkv_proj_is_cut_with_the_config_heads(tmp_path: Path) -> None:
    src = hf_dir(tmp_path / "hf", fused=True)
    r = run_cli("convert", src, tmp_path / "out", "--split-fused", "--executor", "inline", "--no-progress")
    assert r.code == 0, r.err
    from safetensors.torch import load_file

    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    qkv = before["model.layers.1.self_attn.qkv_proj.weight"]
    q, k, v = (after[f"model.layers.1.self_attn.{x}_proj.weight"] for x in "qkv")
    assert (q.shape[0], k.shape[0], v.shape[0]) == (64, 32, 32)
    assert torch.equal(torch.cat([q, k, v]), qkv)
    gate, up = after["model.layers.0.mlp.gate_proj.weight"], after["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(torch.cat([gate, up]), before["model.layers.0.mlp.gate_up_proj.weight"])
