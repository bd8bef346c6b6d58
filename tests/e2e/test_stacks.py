"""Directories written by Lightning, accelerate, the transformers Trainer and torch's HF writer.

Each layout is produced once per session with the real library on CPU (``tests/producers/
stacks.py``: tiny models, 3 steps, 2 gloo ranks for the distributed ones), converted with the
real CLI, and compared bit for bit with what the training process held. Lightning FSDP and
accelerate FSDP need a stand-in to run on CPU (a strategy subclass; the distributed type forced
to FSDP): the producer says how, and neither touches the code that writes the files.

The Trainer's and accelerate-without-FSDP's optimizer state has integer ids and their model is
safetensors, which stores tensors sorted by name: shardfix names the ids by group order against
the model order a ``config.json`` gives (the Trainer) or against every order the module tree
allows (accelerate DDP, no config). One test still passes ``--param-names`` (the names in the
optimizer's group order, as the training process had them), and one passes them in the model's
order, which must be refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shardfix.layouts import open_checkpoint as open_source
from tests.conftest import ROOT, run_cli

pytest.importorskip("lightning", reason="the test-stacks extra is not installed (pip install -e '.[test-stacks]')")
pytest.importorskip("accelerate", reason="the test-stacks extra is not installed (pip install -e '.[test-stacks]')")
pytest.importorskip("transformers", reason="the test-stacks extra is not installed (pip install -e '.[test-stacks]')")

pytestmark = pytest.mark.slow

#: layout -> (what shardfix should call it, the files it must list as not converted, --param-names passed)
CASES: dict[str, tuple[str, set[str], bool]] = {
    "lightning-fsdp": ("lightning-fsdp", {"meta.pt"}, False),
    "accelerate-fsdp": ("accelerate", {"random_states_0.pkl", "random_states_1.pkl", "scheduler.bin"}, False),
    "accelerate-ddp": ("accelerate", {"random_states_0.pkl", "scheduler.bin"}, False),
    "trainer": ("trainer", {"config.json", "generation_config.json", "rng_state.pth", "scheduler.pt",
                            "trainer_state.json", "training_args.bin"}, False),
    "trainer-sharded": ("trainer", {"config.json", "generation_config.json", "rng_state.pth", "scheduler.pt",
                                    "trainer_state.json", "training_args.bin", "model.safetensors.index.json"}, True),
    "hf-writer": ("hf-distributed", set(), False),
    "lightning-ckpt": ("torch", set(), False),
}


@pytest.fixture(scope="session")
def produced(tmp_path_factory: pytest.TempPathFactory):
    """Run each producer once, on first use; ``produced(kind)`` -> its output directory."""
    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("stacks")

    def get(kind: str) -> Path:
        if kind not in cache:
            out = root / kind
            env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            p = subprocess.run([sys.executable, "-m", "tests.producers.stacks", kind, str(out)], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, p.stderr[-4000:]
            cache[kind] = out
        return cache[kind]

    return get


def _source_path(run: Path, kind: str) -> Path:
    return run / "ckpt" / "last.ckpt" if kind == "lightning-ckpt" else run / "ckpt"


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _load_set(out: Path, prefix: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob(f"{prefix}*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.mark.parametrize("kind", list(CASES))
def test_stack_converts_bit_exact_with_every_moment(kind: str, produced, tmp_path: Path) -> None:
    run = produced(kind)
    src = _source_path(run, kind)
    fmt, not_converted, needs_names = CASES[kind]
    ref = torch.load(run / "reference.pt", weights_only=True)
    out = tmp_path / "out"
    flags = ["--param-names", str(run / "param_names.json")] if needs_names else []
    res = run_cli("convert", src, out, "--executor", "inline", "--no-progress", *flags)
    assert res.code == 0, res.err
    report = json.loads((out / "shardfix-report.json").read_text())
    assert report["status"] == "complete" and report["source"]["format"] == fmt

    model = _load_set(out, "model")
    assert set(model) == set(ref["model"])
    assert [k for k, v in ref["model"].items() if not _bits_equal(model[k], v)] == []
    optim = _load_set(out, "optimizer")
    moments = {f"state.{p}.{s}": v for p, sd in ref["optim"].items() for s, v in sd.items()}
    assert set(optim) == set(moments)
    assert [k for k, v in moments.items() if not _bits_equal(optim[k], v)] == []
    if kind != "hf-writer":  # the HF writer takes the model only
        assert len(moments) == 3 * len(ref["model"])  # step, exp_avg, exp_avg_sq of every parameter

    # the ledger: one entry per source key, every key of every file read, nothing else
    ledger = {e["source"] for e in report["ledger"]}
    index = open_source(src).index
    assert ledger == {e.key for e in index.entries}
    assert {f.name for f in map(Path, report["source"]["files"])} >= _tensor_files(src, kind)
    assert {d["file"] for d in report["source"]["not_converted"]} == not_converted
    assert all(d["reason"] for d in report["source"]["not_converted"])
    step = ref["facts"].get("global_step")
    if step is not None:
        assert step in report["findings"]["metadata"].values()
    if kind in ("trainer", "accelerate-ddp"):  # integer ids, named by group order: the ledger says which rule
        rules = [a["rule"] for e in report["ledger"] for a in e.get("actions", []) if a["action"] == "rename"
                 and e["source"].startswith(("optimizer.pt/state.", "optimizer.bin/state."))]
        assert rules and all("group order" in r for r in rules)


def test_trainer_param_names_in_model_order_is_refused(produced, tmp_path: Path) -> None:
    """The Trainer's ids run decay group then no-decay group; a list in model order puts moments under wrong
    names, so the shapes catch it: the whole optimizer is refused with the mismatches named."""
    run = produced("trainer")
    ref = torch.load(run / "reference.pt", weights_only=True)
    names = tmp_path / "model_order.json"
    names.write_text(json.dumps(list(ref["model"])))
    res = run_cli("convert", run / "ckpt", tmp_path / "out", "--executor", "inline", "--no-progress", "--param-names", names)
    assert res.code == 0, res.err
    report = json.loads((tmp_path / "out" / "shardfix-report.json").read_text())
    assert any("--param-names does not fit the state shapes" in w for w in report["warnings"])
    assert not list((tmp_path / "out").glob("optimizer*.safetensors"))


def _tensor_files(src: Path, kind: str) -> set[str]:
    """The files holding tensors, found without shardfix (each must be among the files read)."""
    if src.is_file():
        return {src.name}
    names = {p.name for p in src.rglob("*") if p.suffix in (".distcp", ".safetensors") or p.name == ".metadata"}
    names |= {p.name for p in src.iterdir() if p.name in ("optimizer.pt", "optimizer.bin")}
    return names


def test_accelerate_optimizer_keys_name_their_real_file(produced) -> None:
    """A composed entry keeps where it lives: ``optimizer_0/optimizer.state.<fqn>.exp_avg``."""
    index = open_source(produced("accelerate-fsdp") / "ckpt").index
    keys = {e.key for e in index.entries}
    assert "optimizer_0/optimizer.state.fc.weight.exp_avg" in keys
    assert "pytorch_model_fsdp_0/model.fc.weight" in keys


def test_hf_writer_shards_hold_rows_by_saved_offsets(produced) -> None:
    """Each rank's file holds its own rows (12 + 11 of fc.weight), placed by DCP_SHARDING_INFO."""
    index = open_source(produced("hf-writer") / "ckpt").index
    fc = next(e for e in index.tensors() if e.key == "fc.weight")
    assert fc.shape == (23, 16)
    assert sorted((c.offsets, c.sizes) for c in fc.chunks) == [((0, 0), (12, 16)), ((12, 0), (11, 16))]


def test_unknown_directory_lists_what_it_found_and_what_is_read(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "weights").mkdir()
    res = run_cli("inspect", tmp_path)
    assert res.code == 2
    assert "found notes.txt, weights/" in res.err
    assert "trainer:" in res.err and "accelerate:" in res.err and "dcp:" in res.err
