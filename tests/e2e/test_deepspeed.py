"""DeepSpeed ZeRO 1/2/3 (and ZeRO-2 with bf16) checkpoints made by real DeepSpeed on 2 CPU ranks.

Every logical tensor shardfix reads is compared bit for bit with what the training processes
held (``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``), through the source and
through the real CLI, and with DeepSpeed's own ``zero_to_fp32`` consolidation.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shardfix.cli import main
from shardfix.sources import open_source
from shardfix.sources.base import TensorEntry
from tests.conftest import run_cli

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("deepspeed", reason="the test-deepspeed extra is not installed (pip install -e '.[test-deepspeed]')")

pytestmark = pytest.mark.slow
VARIANTS = ["zero1", "zero2", "zero3", "zero2_bf16"]


@pytest.fixture(scope="session")
def ds_ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.producers.deepspeed_zero import make_checkpoints

    return make_checkpoints(tmp_path_factory.mktemp("deepspeed"))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _ref_key(e: TensorEntry) -> str:
    if e.path[0] == "model":
        return f"model.{e.path[1]}"
    return "step" if e.path[3] == "step" else f"state.{e.path[2]}.{e.path[3]}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_source_reads_every_tensor_bit_exact(ds_ckpts: dict[str, Path], variant: str) -> None:
    root = ds_ckpts[variant]
    ref = load_file(root / "reference.safetensors")
    for path in (root, root / "global_step2"):
        src = open_source(path)
        try:
            assert src.format == "deepspeed"
            tensors = list(src.index.tensors())
            assert all(0 not in e.shape for e in tensors), "a ZeRO-3 placeholder was presented as a weight"
            seen = set()
            for e in tensors:
                got = src.read_tensor(e.key)
                assert _same(got, ref[_ref_key(e)]), e.key
                seen.add(_ref_key(e))
            assert seen == set(ref), sorted(set(ref) ^ seen)
            # every physical tensor of every file is accounted for: it feeds an entry or says why not
            for c in src.containers:
                assert c.feeds or c.note, c.key
            assert any(c.padding for c in src.containers), "no alignment padding was removed"
            straddle = [e.key for e in tensors if len({r.origin for r in src.byte_ranges(e.key)}) > 1]
            assert straddle, "no parameter straddles two ranks' partitions"
        finally:
            src.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_cli_convert_bit_exact(ds_ckpts: dict[str, Path], variant: str, tmp_path: Path) -> None:
    root = ds_ckpts[variant]
    ref = load_file(root / "reference.safetensors")
    r = run_cli("convert", root, tmp_path / "out")
    assert r.code == 0, r.err
    model = load_file(tmp_path / "out" / "model.safetensors")
    optim = load_file(tmp_path / "out" / "optimizer.safetensors")
    want_model = {k.removeprefix("model."): v for k, v in ref.items() if k.startswith("model.")}
    assert sorted(model) == sorted(want_model)
    for k, v in want_model.items():
        assert _same(model[k], v), k
    for k, v in ref.items():
        if k.startswith("state."):
            assert _same(optim[k], v), k
    for name in (k for k in model if f"state.{k}.exp_avg" in ref):
        assert _same(optim[f"state.{name}.step"], ref["step"]), name
    report = json.loads((tmp_path / "out" / "shardfix-report.json").read_text())
    assert report["status"] == "complete"
    assert report["source"]["format"] == "deepspeed"
    src = open_source(root)
    try:
        sources = {e["source"] for e in report["ledger"]}
        assert sources >= {e.key for e in src.index.entries}
        # every physical entry of every rank file: tensors as stored entries, other values as index entries
        assert sources >= {c.key for c in src.containers if c.shape is not None or c.key in src.index.by_key()}
        assert all(c.feeds or c.note or c.shape is None for c in src.containers)
        by_source = {e["source"]: e for e in report["ledger"]}
        partitions = [by_source[s.key] for s in src.index.stored if s.feeds]
        assert partitions and all(e["outputs"] for e in partitions if e["fate"] != "dropped")
        assert any(a["action"] == "unpad" for e in partitions for a in e["actions"]) or variant == "zero1"
    finally:
        src.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_deepspeed_zero_to_fp32(ds_ckpts: dict[str, Path], variant: str) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    theirs = get_fp32_state_dict_from_zero_checkpoint(str(ds_ckpts[variant]))
    src = open_source(ds_ckpts[variant])
    try:
        for name, t in theirs.items():
            ours = src.read_tensor(f"model.{name}")
            t = t.contiguous()  # ZeRO-3 gives lazy GatheredTensor objects
            assert _same(ours.to(t.dtype), t), name  # zero_to_fp32 casts buffers to fp32
    finally:
        src.close()


def _copy(ds_ckpts: dict[str, Path], variant: str, tmp_path: Path) -> Path:
    dst = tmp_path / variant
    shutil.copytree(ds_ckpts[variant], dst)
    return dst


@pytest.mark.parametrize(("variant", "missing"), [
    ("zero2", "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    ("zero2", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ("zero3", "zero_pp_rank_1_mp_rank_00_model_states.pt"),
    ("zero2_bf16", "mp_rank_00_model_states.pt"),
])
def test_missing_file_is_exit_2_naming_it(ds_ckpts: dict[str, Path], tmp_path: Path, variant: str, missing: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy(ds_ckpts, variant, tmp_path)
    (root / "global_step2" / missing).unlink()
    assert main(["convert", str(root), str(tmp_path / "out")]) == 2  # the CLI's own entry point, in process
    assert missing in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize(("variant", "model_file", "message"), [
    ("zero2", "mp_rank_00_model_states.pt", "param group 1: consumed 21 numels out of 19"),
    ("zero3", "zero_pp_rank_0_mp_rank_00_model_states.pt", "ZeRO-3 rank 0 (all param groups): consumed 78 numels out of 77"),
])
def test_tampered_count_is_exit_2(ds_ckpts: dict[str, Path], tmp_path: Path, variant: str, model_file: str,
                                  message: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy(ds_ckpts, variant, tmp_path)
    path = root / "global_step2" / model_file
    sd = torch.load(path, weights_only=False)  # test only: rewrite the file DeepSpeed wrote
    sd["param_shapes"][1]["head.bias"] = torch.Size([9])
    torch.save(sd, path)
    assert main(["convert", str(root), str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
