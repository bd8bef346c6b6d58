"""Nothing is dropped or ignored silently: optimizer-only sources, unread files beside safetensors,
flags that change nothing, and indexes that point outside the output directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from shardfix.errors import BadInputError
from shardfix.outputs.restore import load_optimizer_state
from tests.conftest import cli_in_process

_cli = cli_in_process


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


def test_a_bare_optimizer_state_dict_is_refused_not_written_as_model(tmp_path: Path, capsys) -> None:
    _, opt = _trained()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    code, err = _cli(capsys, "convert", tmp_path / "optimizer.pt", tmp_path / "out", "--no-progress")
    assert code == 2 and "holds optimizer state but no model tensors" in err and "Traceback" not in err
    assert not list(tmp_path.glob("out/*.safetensors"))


def test_optimizer_beside_plain_safetensors_is_named_in_a_warning(tmp_path: Path, capsys) -> None:
    model, opt = _trained()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt / "model.safetensors")
    torch.save(opt.state_dict(), ckpt / "optimizer.pt")
    code, err = _cli(capsys, "convert", ckpt, tmp_path / "out", "--no-progress")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "shardfix-report.json").read_text())
    [warning] = [w for w in report["warnings"] if "optimizer.pt" in w]
    assert "not converted" in warning and "optimizer.pt" in err
    code, err = _cli(capsys, "convert", ckpt, tmp_path / "strict", "--no-progress", "--strict")
    assert code == 3 and "optimizer.pt" in err


def test_vocab_size_that_trims_nothing_is_an_error(tmp_path: Path, capsys) -> None:
    torch.save({"model": {"embed.weight": torch.randn(10, 4)}}, tmp_path / "m.pt")
    code, err = _cli(capsys, "plan", tmp_path / "m.pt", "--vocab-size", "10")
    assert code == 2 and "--vocab-size 10: changes nothing" in err
    code, err = _cli(capsys, "plan", tmp_path / "m.pt", "--vocab-size", "8")
    assert code == 0, err


def test_load_optimizer_state_follows_no_index_entry_outside_the_output(tmp_path: Path) -> None:
    model, _ = _trained()
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "elsewhere.safetensors").write_bytes(b"")
    (out / "optimizer.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": {"state.0.weight.exp_avg": "../elsewhere.safetensors"}}))
    with pytest.raises(BadInputError, match="resolves outside"):
        load_optimizer_state(torch.optim.AdamW(model.parameters()), model, out)
