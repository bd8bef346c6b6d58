"""The pure padding rules, shape by shape."""

from __future__ import annotations

import torch

from shardfix.reconcile.ops import apply_ops, out_shape
from shardfix.reconcile.padding import ShapeFix, find_multiple, reconcile_shape, world_sizes_for


def test_find_multiple_and_world_sizes() -> None:
    assert find_multiple(50257, 128) == 50304
    assert find_multiple(50000, 128) == 50048
    assert world_sizes_for(64, 60) == [8, 16, 32, 64]  # 60 + (-60 % ws) == 64
    assert 4 not in world_sizes_for(64, 60)  # 60 is already a multiple of 4
    assert world_sizes_for(10, 11) == []


def test_vocab_trim_and_transposed_head() -> None:
    fix = reconcile_shape("lm_head.weight", (64, 50304), (50257, 64), vocab=50257, padded_vocab=50304)
    assert isinstance(fix, ShapeFix)
    assert [a["action"] for a in fix.actions] == ["transpose", "trim"]
    t = torch.arange(64 * 50304, dtype=torch.float32).reshape(64, 50304)
    out = apply_ops(t, fix.ops)
    assert torch.equal(out, t.t()[:50257])
    assert out_shape((64, 50304), fix.ops) == (50257, 64)


def test_stacked_tables_trim_table_by_table() -> None:
    fix = reconcile_shape("value_embeds", (3 * 1024, 8), (3 * 1000, 8), vocab=1000, padded_vocab=1024)
    assert isinstance(fix, ShapeFix) and fix.actions[0]["rule"] == "vocab-stacked"
    t = torch.randn(3 * 1024, 8)
    want = torch.cat([t[i * 1024 : i * 1024 + 1000] for i in range(3)])
    assert torch.equal(apply_ops(t, fix.ops), want)


def test_world_size_padding_of_a_vector_and_a_stack() -> None:
    fix = reconcile_shape("scalars", (64,), (60,))
    assert isinstance(fix, ShapeFix) and fix.actions[0]["rule"] == "world-size"
    fix = reconcile_shape("qk_bank", (16, 4, 8), (12, 4, 8))
    assert isinstance(fix, ShapeFix) and fix.actions[0]["rule"] == "world-size"


def test_unreconcilable_and_grow() -> None:
    assert isinstance(reconcile_shape("w", (131, 32), (140, 32)), str)
    assert isinstance(reconcile_shape("w", (100, 32), (50, 32)), str)
    assert isinstance(reconcile_shape("w", (4, 4, 4), (4, 16)), str)
    msg = reconcile_shape("embed.weight", (1000, 8), (1024, 8), vocab=1024)
    assert isinstance(msg, str) and "--allow-grow" in msg
    fix = reconcile_shape("embed.weight", (1000, 8), (1024, 8), vocab=1024, allow_grow=True, grow_init="mean")
    assert isinstance(fix, ShapeFix)
    t = torch.randn(1000, 8)
    out = apply_ops(t, fix.ops)
    assert out.shape == (1024, 8) and torch.equal(out[:1000], t)
    assert torch.equal(out[1000], t.mean(0))
