"""--key-map FILE (TOML): the user's own output names for split parts and renames, "none" and []
to drop, every mistake reported as exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shardfix.api import convert
from shardfix.examples.nanogpt import make_checkpoint
from shardfix.options import ConvertOptions
from tests.conftest import bits_equal, run_cli

LLAMA_NAMES = """
# modded-nanogpt "small" -> transformers-style names
"embed.weight" = "model.embed_tokens.weight"
"blocks.{i}.attn.qkv_w" = ["model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
                           "model.layers.{i}.self_attn.v_proj.weight"]
"blocks.{i}.attn.c_proj.weight" = ["model.layers.{i}.self_attn.o_proj.weight"]
"blocks.{i}.mlp.c_fc.weight" = "model.layers.{i}.mlp.up_proj.weight"
"blocks.{i}.mlp.c_proj.weight" = "model.layers.{i}.mlp.down_proj.weight"
"value_embeds.{i}.weight" = []
"blocks.{i}.lambdas" = []
"""


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("keymap") / "small.pt"
    return path, make_checkpoint(path, "small-qkv", named_optimizer=True)


def test_key_map_targets_the_users_names(small: tuple[Path, dict], tmp_path: Path) -> None:
    src, sd = small
    key_map = tmp_path / "names.toml"
    key_map.write_text(LLAMA_NAMES)
    shapes = tmp_path / "shapes.json"  # targets named after the outputs
    shapes.write_text(json.dumps({"model.embed_tokens.weight": [1000, 64], "lm_head.weight": [1000, 64]}))
    report = convert(src, tmp_path / "out", ConvertOptions(key_map=str(key_map), target_shapes=str(shapes),
                                                           executor="inline", progress=False))
    out = load_file(tmp_path / "out" / "model.safetensors")
    want = {"model.embed_tokens.weight", "lm_head.weight"} | {
        f"model.layers.{i}.{w}.weight" for i in range(2)
        for w in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")}
    assert set(out) == want
    for j, x in enumerate("qkv"):
        assert bits_equal(out[f"model.layers.1.self_attn.{x}_proj.weight"], sd["blocks.1.attn.qkv_w"][j].contiguous())
    assert bits_equal(out["lm_head.weight"], sd["lm_head.weight"][:1000].contiguous())
    ledger = {e["source"]: e for e in report["ledger"]}
    dropped = ledger["model._orig_mod.value_embeds.0.weight"]
    assert dropped["fate"] == "dropped" and "--key-map" in dropped["reason"]
    renamed = ledger["model._orig_mod.embed.weight"]
    assert renamed["outputs"] == ["model.embed_tokens.weight"]
    assert any(a["action"] == "rename" and a["to"] == "model.embed_tokens.weight" for a in renamed["actions"])
    optim = load_file(tmp_path / "out" / "optimizer.safetensors")
    assert "state.model.layers.0.self_attn.q_proj.weight.momentum_buffer" in optim
    assert not any("value_embeds" in k for k in optim)  # moments of a dropped parameter are dropped too


def test_none_drops_one_part_and_the_profile_table_still_applies(tmp_path: Path) -> None:
    src = tmp_path / "qkvo.pt"
    sd = make_checkpoint(src, "qkvo-4hd")
    key_map = tmp_path / "m.toml"
    key_map.write_text('"blocks.{i}.attn.qkvo_w" = ["b.{i}.q", "b.{i}.k", "b.{i}.v", "none"]\n')
    report = convert(src, tmp_path / "out", ConvertOptions(key_map=str(key_map), split_fused=True, executor="inline",
                                                           progress=False))
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert {"b.0.q", "b.0.k", "b.0.v"} <= set(out) and not any(k.startswith("blocks.0.attn") for k in out)
    assert bits_equal(out["b.0.v"], sd["blocks.0.attn.qkvo_w"][2].contiguous())
    assert "blocks.0.mlp.c_fc.weight" in out  # the profile's own rule, with --split-fused
    entry = {e["source"]: e for e in report["ledger"]}["model._orig_mod.blocks.0.attn.qkvo_w"]
    assert entry["outputs"] == ["b.0.q", "b.0.k", "b.0.v"]
    (drop,) = [a for a in entry["actions"] if a["action"] == "drop"]
    assert drop["part"] == "o" and drop["shape"] == [64, 64] and "none" in drop["reason"]


def test_key_map_alone_touches_only_what_it_names(small: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = small
    key_map = tmp_path / "m.toml"
    key_map.write_text('"embed.weight" = "tok.weight"\n')
    r = run_cli("plan", src, "--key-map", key_map, "--json")
    assert r.code == 0, r.err
    names = {t["name"] for f in json.loads(r.out)["files"] for t in f["tensors"]}
    assert "tok.weight" in names and "blocks.0.attn.qkv_w" in names


@pytest.mark.parametrize("text, needles", [
    ('"blocks.{i}.attn.qkv_w" = ["a.{i}", "b.{i}"]\n', ["gives 2 output name(s)", "3 part(s) per layer (q, k, v)"]),
    ('"blocks.{i}.attn.qkv_x" = ["a.{i}"]\n', ["'blocks.{i}.attn.qkv_x' matches no tensor"]),
    ('"embed.weight" = "lm_head.weight"\n', ["lm_head.weight: written from", "embed.weight"]),
    ('"blocks.{i}.attn.qkv_w" = [1, 2, 3]\n', ["must map to a list of output names"]),
    ('blocks.{i} = [\n', ["is not valid TOML"]),
])
def test_key_map_mistakes_exit_2(small: tuple[Path, dict], tmp_path: Path, text: str, needles: list[str]) -> None:
    src, _ = small
    key_map = tmp_path / "m.toml"
    key_map.write_text(text)
    r = run_cli("plan", src, "--key-map", key_map)
    assert r.code == 2, r.out
    assert "Traceback" not in r.err
    for needle in needles:
        assert needle in r.err, (needle, r.err)


def test_a_tensor_the_profile_does_not_know_is_cut_along_dim_0(small: tuple[Path, dict], tmp_path: Path) -> None:
    src, sd = small
    key_map = tmp_path / "m.toml"
    key_map.write_text('"blocks.{i}.lambdas" = ["blocks.{i}.lambda_x", "blocks.{i}.lambda_x0"]\n'
                       '"blocks.{i}.mlp.c_fc.weight" = ["blocks.{i}.mlp.gate", "blocks.{i}.mlp.up"]\n')
    convert(src, tmp_path / "out", ConvertOptions(key_map=str(key_map), executor="inline", progress=False))
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert bits_equal(out["blocks.1.lambda_x0"], sd["blocks.1.lambdas"][1].clone())
    assert bits_equal(out["blocks.0.mlp.up"], sd["blocks.0.mlp.c_fc.weight"][128:].clone())
