"""Key rules: containers found, wrapper prefixes stripped wherever they occur, each change recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from shardfix.api import convert
from shardfix.options import ConvertOptions
from shardfix.reconcile.keys import classify, strip_wrappers
from tests.conftest import bits_equal


def test_strip_wrappers_anywhere() -> None:
    assert strip_wrappers("_orig_mod.embed.weight") == ("embed.weight", ["_orig_mod"])
    assert strip_wrappers("module._orig_mod.blocks.0.w") == ("blocks.0.w", ["module", "_orig_mod"])
    assert strip_wrappers("layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.mlp.w")[0] == "layers.0.mlp.w"
    assert strip_wrappers("embed.weight") == ("embed.weight", [])


def test_classify_paths() -> None:
    assert classify(("model", "_orig_mod.w"), False).kind == "model"
    r = classify(("optimizers", 1, "state", 3, "exp_avg"), False)
    assert (r.kind, r.optimizer, r.param, r.state) == ("optim_state", 1, 3, "exp_avg")
    r = classify(("optim", "param_groups", "0", "lr"), False)
    assert (r.kind, r.group, r.hparam) == ("param_group", 0, "lr")
    assert classify(("step",), False).kind == "meta"
    assert classify(("w",), True).kind == "model"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(3, 2, bias=False)


@pytest.mark.parametrize(
    "layout",
    ["flat", "model", "state_dict", "module", "compiled", "ddp_compiled"],
)
def test_model_is_found_and_names_are_the_models_own(layout: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = Net()
    sd = net.state_dict()
    if layout == "compiled":
        saved = {"model": {f"_orig_mod.{k}": v for k, v in sd.items()}, "step": 10, "code": "print(1)"}
    elif layout == "ddp_compiled":
        saved = {"state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}}
    elif layout == "flat":
        saved = dict(sd)
    else:
        saved = {layout: dict(sd), "epoch": 3}
    src = tmp_path / "ckpt.pt"
    torch.save(saved, src)
    out = tmp_path / "out"
    report = convert(src, out, ConvertOptions(executor="inline", progress=False))
    got = load_file(out / "model.safetensors")
    fresh = Net()
    fresh.load_state_dict(got, strict=True)
    for k, v in sd.items():
        assert bits_equal(got[k], v)
    ledger = {e["source"]: e for e in report["ledger"]}
    assert len(ledger) == len(report["ledger"])
    for e in report["ledger"]:
        if e["kind"] == "tensor":
            assert e["fate"] == "written" and len(e["outputs"]) == 1
            if e["source"] != e["outputs"][0]:
                assert e["actions"][0]["action"] == "rename"
                assert e["actions"][0]["to"] == e["outputs"][0]
        else:
            assert e["fate"] == "dropped" and e["reason"]
    if layout == "compiled":
        assert report["findings"]["prefixes_stripped"] == {"_orig_mod.": 3}
        assert report["findings"]["metadata"]["step"] == 10
        assert ledger["model._orig_mod.a.weight"]["outputs"] == ["a.weight"]
