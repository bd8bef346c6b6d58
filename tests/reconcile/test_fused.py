"""--split-fused: every modded-nanogpt layout becomes separate q/k/v/o and [out, in] MLP weights that
load strict=True into a separate-weights model whose forward equals the fused reference exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from shardfix.api import convert
from shardfix.examples.nanogpt import VARIANTS, default_geometry, make_checkpoint
from shardfix.options import ConvertOptions
from shardfix.reconcile.ops import apply_ops
from tests.conftest import bits_equal, run_cli
from tests.nanogpt_reference import FusedWeights, SeparateGPT, forward


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Each variant's checkpoint, converted with --split-fused and the target model's shapes."""
    root = tmp_path_factory.mktemp("split")
    out: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        g = default_geometry(variant)
        src = make_checkpoint(root / f"{variant}.pt", variant)
        shapes = root / f"{variant}.shapes.json"
        shapes.write_text(json.dumps({k: list(t.shape) for k, t in SeparateGPT(variant, g).state_dict().items()}))
        opts = ConvertOptions(split_fused=True, vocab_size=g.vocab, target_shapes=str(shapes), executor="inline",
                              progress=False)
        report = convert(root / f"{variant}.pt", root / variant, opts)
        out[variant] = {"src": src, "g": g, "out": root / variant, "report": report}
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_split_loads_strict_and_forward_equals_fused_reference(converted: dict, variant: str) -> None:
    c = converted[variant]
    g = c["g"]
    model = SeparateGPT(variant, g)
    model.load_state_dict(load_file(c["out"] / "model.safetensors"), strict=True)
    tokens = torch.randint(0, g.vocab, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = forward(tokens, FusedWeights(c["src"], variant, g), g)
        got = model(tokens)
    assert want.shape[-1] == g.padded_vocab and got.shape[-1] == g.vocab
    # Same matmuls on the same values: the fused GEMM's rows are the separate GEMMs (CPU float32), so
    # the logits are bit-identical, padded vocab columns aside.
    assert torch.equal(want[..., : g.vocab], got)
    assert c["report"]["status"] == "complete"
    assert c["report"]["findings"]["profile"]["variant"] == variant


def _ops_of(report: dict) -> dict[str, list[dict]]:
    return {t["name"]: t["ops"] for f in report["outputs"]["files"] for t in f["tensors"]}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_split_outputs_concatenate_back_to_the_source(converted: dict, variant: str) -> None:
    """Each split entry lists its outputs in storage order: undoing each output's transpose and
    concatenating them gives the source's elements in order, minus only the dropped padding."""
    report = converted[variant]["report"]
    ops = _ops_of(report)
    splits = [e for e in report["ledger"] if e["fate"] == "split" and e["source"].startswith("model.")]
    assert splits, "every variant has a fused tensor"
    for e in splits:
        n = 1
        for d in e["shape"]:
            n *= d
        index = torch.arange(n).reshape(e["shape"])
        pieces = []
        for name in e["outputs"]:
            m = apply_ops(index, ops[name])
            if sum(op["op"] == "transpose" for op in ops[name]) % 2:
                m = m.T
            pieces.append(m.reshape(-1))
        flat = torch.cat(pieces)
        dropped = sum(torch.Size(a["shape"]).numel() for a in e["actions"] if a["action"] == "drop")
        assert flat.numel() + dropped == n, e["source"]
        assert bool((flat[1:] > flat[:-1]).all()), f"{e['source']}: outputs are not in storage order"
        if not dropped:
            assert torch.equal(flat, torch.arange(n)), e["source"]


@pytest.mark.parametrize("variant", ["banks", "banks-qk-vo"])
def test_bank_padding_is_dropped_with_a_reason(converted: dict, variant: str) -> None:
    c = converted[variant]
    g = c["g"]
    ledger = {e["source"]: e for e in c["report"]["ledger"]}
    mlp = ledger["model._orig_mod.mlp_bank"]
    drops = [a for a in mlp["actions"] if a["action"] == "drop"]
    assert [a["index"] for a in drops] == [g.layers]  # the one padding layer
    assert "padding" in drops[0]["reason"] and "x0_lambdas" in drops[0]["reason"]
    assert mlp["outputs"] == [f"blocks.{i}.mlp.{w}.weight" for i in range(g.layers) for w in ("c_fc", "c_proj")]
    model = load_file(c["out"] / "model.safetensors")
    assert not any(k.startswith(f"blocks.{g.layers}.") for k in model)
    src = c["src"]
    for i in range(g.layers):
        assert bits_equal(model[f"blocks.{i}.mlp.c_fc.weight"], src["mlp_bank"][i, 0].contiguous())
        assert bits_equal(model[f"blocks.{i}.mlp.c_proj.weight"], src["mlp_bank"][i, 1].T.contiguous())
    if variant == "banks-qk-vo":
        for bank, real in (("qk_bank", g.layers * g.heads), ("vo_bank", 2 * g.layers)):
            (drop,) = [a for a in ledger[f"model._orig_mod.{bank}"]["actions"] if a["action"] == "drop"]
            assert drop["rows"] == [real, src[bank].shape[0]] and "zero padding" in drop["reason"]
            assert bool((src[bank][real:] == 0).all())


@pytest.mark.parametrize("variant", ["small-qkv", "qkvo-h4d"])
def test_optimizer_moments_follow_the_split(tmp_path: Path, variant: str) -> None:
    """With param_names recorded, each moment of a fused parameter is cut exactly like it."""
    g = default_geometry(variant)
    make_checkpoint(tmp_path / "ckpt.pt", variant, named_optimizer=True)
    report = convert(tmp_path / "ckpt.pt", tmp_path / "out",
                     ConvertOptions(split_fused=True, vocab_size=g.vocab, executor="inline", progress=False))
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    muon = saved["optimizers"][1]
    names = muon["param_groups"][0]["param_names"]
    moments = {names[i]: s["momentum_buffer"] for i, s in muon["state"].items()}
    optim = load_file(tmp_path / "out" / "optimizer.safetensors")
    fused = "blocks.0.attn.qkv_w" if variant == "small-qkv" else "blocks.0.attn.qkvo_w"
    parts = moments[fused].view(-1, g.hdim, g.dim)
    for j, w in enumerate(("c_q", "c_k", "c_v", "c_proj")[: parts.shape[0]]):
        assert bits_equal(optim[f"state.blocks.0.attn.{w}.weight.momentum_buffer"], parts[j].contiguous())
    if variant == "qkvo-h4d":  # raw c_fc is stored [in, out]: its moment is written [out, in] too
        assert bits_equal(optim["state.blocks.0.mlp.c_fc.weight.momentum_buffer"],
                          moments["blocks.0.mlp.c_fc"].T.contiguous())
        assert bits_equal(optim["state.blocks.0.mlp.c_proj.weight.momentum_buffer"], moments["blocks.0.mlp.c_proj"])
    ledger = {e["source"]: e for e in report["ledger"]}
    entry = next(e for k, e in ledger.items() if k.startswith("optimizers.1.state.") and e["fate"] == "split")
    assert all("(follows its parameter)" in a["rule"] for a in entry["actions"] if a["action"] == "split")


def test_every_source_key_is_in_the_ledger(converted: dict) -> None:
    for variant, c in converted.items():
        saved = torch.load(c["out"].parent / f"{variant}.pt", weights_only=True)
        keys = {f"model.{k}" for k in saved["model"]}
        ledger = {e["source"] for e in c["report"]["ledger"]}
        assert keys <= ledger, variant


def test_companions_follow_the_split(tmp_path: Path) -> None:
    sd = make_checkpoint(tmp_path / "ckpt.pt", "qkvo-h4d")
    masks = {"blocks.0.attn.qkvo_w": (sd["blocks.0.attn.qkvo_w"] > 0).float(), "blocks.0.mlp.c_fc": torch.randn(64, 256)}
    torch.save(masks, tmp_path / "masks.pt")
    convert(tmp_path / "ckpt.pt", tmp_path / "out", ConvertOptions(split_fused=True, companions=str(tmp_path / "masks.pt"),
                                                                   executor="inline", progress=False))
    comp = load_file(tmp_path / "out" / "companions.safetensors")
    mask = masks["blocks.0.attn.qkvo_w"].view(4, 64, 64)
    for j, w in enumerate(("c_q", "c_k", "c_v", "c_proj")):
        assert bits_equal(comp[f"blocks.0.attn.{w}.weight"], mask[j].contiguous())
    assert bits_equal(comp["blocks.0.mlp.c_fc.weight"], masks["blocks.0.mlp.c_fc"].T.contiguous())


@pytest.mark.slow
def test_bank_layer_count_comes_from_the_config_when_shapes_lack_it(tmp_path: Path) -> None:
    """Without x0_lambdas nothing says which mlp_bank slot is padding: refused, unless the config says."""
    sd = make_checkpoint(tmp_path / "full.pt", "banks")
    model = {f"_orig_mod.{k}": v for k, v in sd.items() if k != "x0_lambdas"}
    torch.save({"step": 1, "model": model}, tmp_path / "ckpt.pt")
    r = run_cli("plan", tmp_path / "ckpt.pt", "--split-fused")
    assert r.code == 2 and "mlp_bank" in r.err and "num_hidden_layers" in r.err
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 3}))
    r = run_cli("plan", tmp_path / "ckpt.pt", "--split-fused", "--target-config", config, "--json")
    assert r.code == 0, r.err
    entry = {e["source"]: e for e in json.loads(r.out)["ledger"]}["model._orig_mod.mlp_bank"]
    (drop,) = [a for a in entry["actions"] if a["action"] == "drop"]
    assert len(entry["outputs"]) == 6 and "num_hidden_layers" in drop["reason"]
    # a layer without attention (2026: attn_bank has one slot fewer than the layers) is refused
    model["_orig_mod.attn_bank"] = model["_orig_mod.attn_bank"][:2].clone()
    torch.save({"step": 1, "model": model}, tmp_path / "ckpt.pt")
    r = run_cli("plan", tmp_path / "ckpt.pt", "--split-fused", "--target-config", config)
    assert r.code == 2 and "attn_bank" in r.err and "2 slots for 3 layers" in r.err
