"""Megatron-core ``torch_dist`` checkpoints made by the real library, converted by the real CLI.

The producer (``tests/producers/megatron_dist.py``) trains a tiny GPTModel for two steps on CPU
with gloo and saves it with ``dist_checkpointing.save``; it applies small CPU stand-ins for
Megatron's CUDA-only calls that leave the file format untouched (see its docstring). Every model
tensor and every moment the CLI writes is compared bit for bit with what the training processes
held, after unstacking the layer axis and trimming the vocab padding (1024 -> 1000 rows).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[test-megatron]')")
pytest.importorskip("psutil", reason="megatron's checkpoint writer needs psutil (pip install -e '.[test-megatron]')")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 1000
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
CASES = {
    "tp2-per-layer": ["--tp", "2", "--per-layer"],
    "tp2dp2-fully": ["--tp", "2", "--dp", "2", "--optim", "fully_reshardable"],
    "tp2dp2-dp": ["--tp", "2", "--dp", "2", "--optim", "dp_reshardable"],
}


@pytest.fixture(scope="session")
def megatron_ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("megatron")
    for name, args in CASES.items():
        subprocess.run([sys.executable, str(ROOT / "tests/producers/megatron_dist.py"), str(base / name), *args],
                       check=True, cwd=ROOT, capture_output=True, timeout=300)
    return {name: base / name for name in CASES}


def _convert(ckpt: Path, out: Path) -> dict:
    res = subprocess.run([sys.executable, "-m", "shardfix", "convert", str(ckpt / "iter_0000002"), str(out),
                          "--vocab-size", str(VOCAB), "--executor", "inline", "--no-progress"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "shardfix-report.json").read_text())


def _per_layer(key: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model-name tensors for one reference key: stacked layers cut, vocab padding trimmed."""
    if key in VOCAB_KEYS:
        return {key: t[:VOCAB]}
    rest = key.removeprefix("decoder.layers.")
    if rest != key and not rest.split(".")[0].isdigit():
        return {f"decoder.layers.{i}.{rest}": t[i] for i in range(t.shape[0])}
    return {key: t}


def _expected(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model: dict[str, torch.Tensor] = {}
    optim: dict[str, torch.Tensor] = {}
    with safe_open(str(ckpt / "reference.safetensors"), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if key.startswith("optimizer.state."):
                state, _, param = key.removeprefix("optimizer.state.").partition(".")
                for name, v in _per_layer(param, t).items():
                    optim[f"state.{name}.{state}"] = v
            else:
                model.update(_per_layer(key, t))
    return model, optim


def _written(out: Path, prefix: str) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    for p in sorted(out.glob(f"{prefix}*.safetensors")):
        with safe_open(str(p), "pt") as f:
            got.update({k: f.get_tensor(k) for k in f.keys()})
    return got


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: names differ"
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(_bits(got[k]), _bits(v)), f"{what} {k} differs"


def _source_keys(ckpt: Path) -> set[str]:
    from shardfix.io.safe_pickle import load_metadata_pickle
    from shardfix.sources.megatron_common import load_common

    md = load_metadata_pickle(ckpt / "iter_0000002" / ".metadata")
    common = load_common(ckpt / "iter_0000002" / "common.pt")

    def leaves(tree: object, prefix: str) -> set[str]:
        if isinstance(tree, dict):
            return set().union(*(leaves(v, f"{prefix}.{k}") for k, v in tree.items())) if tree else {prefix}
        if prefix.endswith(".param_groups") and isinstance(tree, list):
            return {f"{prefix}.{i}.{hp}" for i, g in enumerate(tree) for hp in g}
        return {prefix}

    return set(md.state_dict_metadata) | leaves(common, "common")


@pytest.mark.parametrize("case", list(CASES))
def test_megatron_convert(case: str, megatron_ckpts: dict[str, Path], tmp_path: Path) -> None:
    ckpt = megatron_ckpts[case]
    report = _convert(ckpt, tmp_path / "out")
    assert report["status"] == "complete"
    assert report["source"]["format"] == "megatron"
    assert report["findings"]["profile"]["name"] == "megatron"
    want_model, want_optim = _expected(ckpt)
    model = _written(tmp_path / "out", "model")
    _assert_bitwise(model, want_model, "model")
    assert not any(k.startswith(("optimizer.", "state.")) for k in model), "optimizer tensor in a model file"
    optim = _written(tmp_path / "out", "optimizer")
    if case == "tp2dp2-fully":
        _assert_bitwise({k: v for k, v in optim.items() if not k.endswith(".step")}, want_optim, "optimizer")
        groups = json.loads((tmp_path / "out" / "optimizer_param_groups.json").read_text())["param_groups"]
        assert [g["weight_decay"] for g in groups] == [0.1, 0.1] and groups[0]["step"] == 2.0
    else:
        assert optim == {}
    if case == "tp2dp2-dp":
        assert any("dp_reshardable" in n and "fully_reshardable" in n for n in report["source"]["notes"])
        assert any("dp_reshardable" in w and "fully_reshardable" in w for w in report["warnings"])  # loud, not only a note
    ledger = {e["source"]: e for e in report["ledger"]}
    assert set(ledger) == _source_keys(ckpt)
    for key, e in ledger.items():
        if "_extra_state" in key or key.startswith("optimizer.distributed."):
            assert e["fate"] == "dropped" and not e["outputs"], key
        if key.startswith("decoder.layers.") and case != "tp2-per-layer" and "_extra_state" not in key \
                and not key.startswith("decoder.layers.final"):
            assert e["fate"] == "split", key
