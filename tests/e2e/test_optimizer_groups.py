"""Integer-keyed optimizer state named by group order, and tied parameters restored by any alias.

* modded-nanogpt: ``shardfix.examples.nanogpt`` writes the scripts' checkpoint (``optimizers``:
  Adam over head / embeddings / scalars, SGD-momentum over the matrices, no recorded names)
  with four same-shaped ``[1024, 64]`` tables (embed, two value embeddings, lm_head); the
  profile's declared grouping makes the mapping unique.
* A tied-embedding Llama (``tie_word_embeddings=True``) trained with FSDP2 on 2 gloo ranks and
  saved with DCP ``get_state_dict`` (``tests/producers/tied_step.py``): its state, keyed by
  ``model.embed_tokens.weight``, restores through ``load_optimizer_state`` into a fresh tied
  model, and one more AdamW step matches the training process's state continued one step.
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

from shardfix import load_optimizer_state
from shardfix.examples.nanogpt import make_checkpoint
from shardfix.layouts import open_checkpoint
from tests.conftest import ROOT, run_cli


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _nanogpt_names(model: dict[str, torch.Tensor]) -> list[list[str]]:
    """The parameters each optimizer lists, in its id order: how the example script groups them."""
    head = [n for n in model if n.startswith("lm_head")]
    embeds = [n for n in model if "embed" in n]
    vectors = [n for n in model if model[n].dim() < 2 and n not in head + embeds]
    return [head + embeds + vectors, [n for n in model if n not in head + embeds + vectors]]


def test_nanogpt_optimizers_list_converts_without_param_names(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    model = make_checkpoint(ckpt, "qkvo-4hd")
    tables = [n for n, t in model.items() if tuple(t.shape) == (1024, 64)]
    assert len(tables) == 4  # embed, value_embeds.0, value_embeds.1, lm_head: shapes alone cannot tell them apart
    res = run_cli("convert", ckpt, tmp_path / "out", "--executor", "inline", "--no-progress")
    assert res.code == 0, res.err
    report = json.loads((tmp_path / "out" / "shardfix-report.json").read_text())
    assert not [w for w in report["warnings"] if "optimizer" in w]
    saved = torch.load(ckpt, weights_only=True)["optimizers"]
    written = load_file(tmp_path / "out" / "optimizer.safetensors")
    expected = {}
    for k, names in enumerate(_nanogpt_names(model)):
        ids = [i for g in saved[k]["param_groups"] for i in g["params"]]
        for i, name in zip(ids, names, strict=True):
            for s, v in saved[k]["state"][i].items():
                expected[f"state.{name}.{s}"] = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
    assert set(written) == set(expected)
    assert [k for k, v in expected.items() if not _bits_equal(written[k], v)] == []
    rule = next(e for e in report["ledger"] if e["source"] == "optimizers.0.state.0.exp_avg")["actions"][0]["rule"]
    assert "lm_head.weight" in rule and "group order" in rule and "profile declares the grouping" in rule
    assert {e["source"] for e in report["ledger"]} == {e.key for e in open_checkpoint(ckpt).index.entries}


@pytest.fixture(scope="session")
def tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers", reason="the test-hf extra is not installed (pip install -e '.[test-hf]')")
    out = tmp_path_factory.mktemp("tied")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, "-m", "tests.producers.tied_step", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    return out


@pytest.mark.slow
def test_tied_embedding_state_restores_and_steps_bit_for_bit(tied: Path, tmp_path: Path) -> None:
    from tests.producers.hf_models import build_base
    from tests.producers.tied_step import adamw, one_step

    out = tmp_path / "out"
    res = run_cli("convert", tied / "checkpoint", out, "--executor", "inline", "--no-progress")  # keeps the 1024 rows it trained
    assert res.code == 0, res.err
    ref = torch.load(tied / "reference.pt", weights_only=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the producer's ranks ran
    try:
        fresh = build_base(tied=True, seed=5)
        assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
        loaded = fresh.load_state_dict(load_file(out / "model.safetensors"), strict=False)
        # tied: the matrix is written once, under its embedding name, as transformers saves it
        assert loaded.missing_keys == ["lm_head.weight"] and not loaded.unexpected_keys
        optim = adamw(fresh)
        result = load_optimizer_state(optim, fresh, out, strict=True)
        assert "model.embed_tokens.weight" in result.loaded and result.ok, result.summary()
        assert len(result.loaded) == len(ref["optim"])
        state = optim.state[fresh.lm_head.weight]
        assert all(_bits_equal(state[s], v) for s, v in ref["optim"]["model.embed_tokens.weight"].items())
        after = one_step(fresh, optim)
    finally:
        torch.set_num_threads(threads)
    assert set(after) == set(ref["after_step"])
    assert [n for n, v in ref["after_step"].items() if not _bits_equal(after[n], v)] == []


@pytest.mark.slow
def test_tied_padding_rows_are_a_finding_not_a_warning(tied: Path, tmp_path: Path) -> None:
    res = run_cli("convert", tied / "checkpoint", tmp_path / "out", "--executor", "inline", "--no-progress",
                  "--vocab-size", "1000")
    assert res.code == 0, res.err
    report = json.loads((tmp_path / "out" / "shardfix-report.json").read_text())
    assert not [w for w in report["warnings"] if "were trained" in w]
    rows = report["findings"]["evidence"]["vocab_rows"]
    item = next(r for r in rows if r["tensor"] == "model.embed_tokens.weight")
    assert item["tied"] and "softmax" in item["note"] and item["likely_vocab_at_most"] is None
