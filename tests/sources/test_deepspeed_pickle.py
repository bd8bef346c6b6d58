"""The DeepSpeed allowlist unpickler refuses every global a genuine DeepSpeed file does not reference."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from shardfix.errors import UnsafeInputError
from shardfix.sources.deepspeed_pickle import Stored, load_tree


def test_plain_torch_save_tree_is_described_not_loaded(tmp_path: Path) -> None:
    t = torch.arange(10, dtype=torch.float32)
    torch.save({"a": t[2:7], "n": 3, "s": torch.Size([2, 3])}, tmp_path / "f.pt")
    tree = load_tree(tmp_path / "f.pt")
    assert isinstance(tree["a"], Stored) and tree["a"].shape == (5,) and tree["a"].numel == 5
    assert tree["n"] == 3 and tree["s"] == (2, 3)
    with open(tmp_path / "f.pt", "rb") as f:  # element 0 of the view lies where the tree says
        f.seek(tree["a"].start)
        assert torch.frombuffer(bytearray(f.read(20)), dtype=torch.float32).tolist() == [2, 3, 4, 5, 6]


def test_foreign_global_is_refused(tmp_path: Path) -> None:
    torch.save({"c": collections.Counter("ab")}, tmp_path / "f.pt")
    with pytest.raises(UnsafeInputError, match="refuses to load global collections.Counter"):
        load_tree(tmp_path / "f.pt")
