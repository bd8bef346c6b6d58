"""The architecture check: a config's heads / kv heads / head_dim / hidden size against every
attention tensor's shape. A mismatch is exit 2 naming the tensor, its shape and the config field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardfix.examples.nanogpt import make_checkpoint
from shardfix.reconcile.arch import arch_config, check_architecture, head_candidates
from tests.conftest import run_cli
from tests.hf_checkpoint import hf_dir


def cfg(**kw):
    c, problems = arch_config(kw, "config.json")
    assert c is not None
    return c, problems


@pytest.fixture(scope="module")
def qkv_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("arch") / "small.pt"
    make_checkpoint(path, "small-qkv")  # dim 64, 4 heads of 16
    return path


def _config(tmp_path: Path, **kw) -> Path:
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 1000, **kw}))
    return p


def test_matching_config_passes_and_splits(qkv_ckpt: Path, tmp_path: Path) -> None:
    r = run_cli("plan", qkv_ckpt, "--split-fused", "--target-config", _config(tmp_path, head_dim=16))
    assert r.code == 0, r.err


@pytest.mark.parametrize("command", [["plan"], ["plan", "--split-fused"], ["inspect", "--no-evidence"]])
def test_config_heads_disagree_with_the_tensors_exit_2_naming_both(qkv_ckpt: Path, tmp_path: Path,
                                                                   command: list[str]) -> None:
    config = _config(tmp_path, num_attention_heads=5, num_key_value_heads=5, head_dim=16)
    r = run_cli(command[0], qkv_ckpt, *command[1:], "--target-config", config)
    assert r.code == 2, r.out + r.err
    assert "Traceback" not in r.err
    split = "--split-fused" in command
    assert ("blocks.0.attn.c_q.weight: shape [64, 64]" if split else "blocks.0.attn.qkv_w: shape [3, 64, 64]") in r.err
    assert "num_attention_heads=5" in r.err and "4 heads of head_dim 16" in r.err and str(config) in r.err


def test_gqa_config_against_equal_qkv_stack(qkv_ckpt: Path, tmp_path: Path) -> None:
    r = run_cli("plan", qkv_ckpt, "--target-config", _config(tmp_path, num_key_value_heads=2))
    assert r.code == 2
    assert "blocks.0.attn.qkv_w: shape [3, 64, 64]" in r.err and "num_key_value_heads=2" in r.err


def test_gqa_aware_on_separate_projections(tmp_path: Path) -> None:
    src = hf_dir(tmp_path / "hf", heads=4, kv=2, hd=16)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}))
    assert run_cli("plan", src, "--target-config", good).code == 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4}))
    r = run_cli("plan", src, "--target-config", bad)
    assert r.code == 2
    assert "model.layers.0.self_attn.k_proj.weight: shape [32, 64]" in r.err
    assert "num_key_value_heads=4" in r.err and "2 heads of head_dim 16" in r.err
    assert "q_proj" not in r.err  # the query heads agree


def test_the_80_vs_64_head_dim_bug_is_caught_from_shapes_alone() -> None:
    """A model with 40 heads of 64 (hidden 2560) given a config of 120 heads of 80 is refused
    before anything reshapes [4, 150, 3, 120, 80]."""
    c, problems = cfg(hidden_size=2560, num_attention_heads=120, head_dim=80)
    shapes = {"model.layers.0.self_attn.q_proj.weight": (2560, 2560), "model.layers.0.self_attn.o_proj.weight": (2560, 2560)}
    out = check_architecture(shapes, c)
    assert len(out) == 2 and all("num_attention_heads=120" in p and "[2560, 2560]" in p for p in out)
    assert not problems


def test_config_internal_problems_and_decoupled_head_dim() -> None:
    _, problems = cfg(hidden_size=64, num_attention_heads=5)
    assert problems and "not divisible by num_attention_heads=5" in problems[0]
    _, problems = cfg(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)
    assert problems and "num_key_value_heads=3" in problems[0]
    # hidden != heads * head_dim is legal when the tensors show it (Gemma-style) ...
    c, _ = cfg(hidden_size=64, num_attention_heads=2, head_dim=64)
    assert check_architecture({"l.0.self_attn.q_proj.weight": (128, 64), "l.0.self_attn.o_proj.weight": (64, 128)}, c) == []
    # ... and a problem when no attention tensor confirms it
    assert "hidden_size=64 != num_attention_heads=2 x head_dim=64" in check_architecture({"w": (3, 3)}, c)[0]


def test_every_fused_layout_is_checked() -> None:
    c, _ = cfg(hidden_size=64, num_attention_heads=4)
    rules_ok = {"blocks.0.attn.qkvo_w": (64, 256), "blocks.1.attn.qkvo_w": (256, 64), "blocks.2.attn.qkvo_w": (4, 64, 64),
                "attn_bank": (3, 256, 64), "qk_bank": (16, 32, 64), "vo_bank": (8, 64, 64)}
    from shardfix.inspect.profiles._nanogpt import ATTENTION

    assert check_architecture(rules_ok, c, ATTENTION) == []
    c8, _ = cfg(hidden_size=64, num_attention_heads=8, head_dim=8)
    out = check_architecture({"qk_bank": (16, 32, 64)}, c8, ATTENTION)
    assert out and "head_dim=8" in out[0] and "heads of 16" in out[0]
    c_wide, _ = cfg(hidden_size=80, num_attention_heads=4, head_dim=16)
    out = check_architecture({"attn_bank": (3, 256, 64)}, c_wide, ATTENTION)
    assert any("hidden_size=80" in p for p in out)


def test_head_candidates_prefer_common_head_dims() -> None:
    assert head_candidates(2560)[:2] == [{"heads": 20, "head_dim": 128}, {"heads": 40, "head_dim": 64}]
    assert {"heads": 4, "kv_heads": 2, "head_dim": 16} in head_candidates(64, 32)
