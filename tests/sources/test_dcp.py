"""DCP reading beyond the default save: per-rank metadata sets, assembly by offsets."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from shardfix.errors import IncompleteSourceError
from shardfix.sources import detect_format, open_source
from tests.conftest import bits_equal, run_cli


def test_per_rank_metadata_set_reads_like_the_collective_save(fsdp_run: Path, reference: dict) -> None:
    nocoll = fsdp_run / "checkpoint_nocoll"
    assert not (nocoll / ".metadata").exists() and (nocoll / "__1.metadata").exists()
    assert detect_format(nocoll) == "dcp"
    src = open_source(nocoll)
    assert "merged 2 per-rank metadata files" in src.index.notes
    model_keys = [e.key for e in src.index.tensors() if e.key.startswith("model.")]
    assert sorted(k.removeprefix("model.") for k in model_keys) == sorted(reference["model"])
    for key in model_keys:
        assert bits_equal(src.read_tensor(key), reference["model"][key.removeprefix("model.")]), key
    for fqn, states in reference["optim"]["state"].items():
        for sname, want in states.items():
            assert bits_equal(src.read_tensor(f"optim.state.{fqn}.{sname}"), want)


def test_a_missing_rank_metadata_is_an_incomplete_checkpoint(fsdp_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ckpt"
    shutil.copytree(fsdp_run / "checkpoint_nocoll", copy)
    (copy / "__1.metadata").unlink()
    with pytest.raises(IncompleteSourceError, match="cover .* of .* elements"):
        open_source(copy)
    r = run_cli("inspect", copy)
    assert r.code == 2 and "__N.metadata" in r.err and "Traceback" not in r.err


def test_chunks_are_placed_by_offsets_not_rank_order(fsdp_ckpt: Path, reference: dict) -> None:
    src = open_source(fsdp_ckpt)
    entry = next(e for e in src.index.tensors() if e.key == "model.router.weight")
    # reading the chunks in reverse order must give the same tensor: placement is by offsets
    entry.chunks = tuple(reversed(entry.chunks))
    assert bits_equal(src.read_tensor("model.router.weight"), reference["model"]["router.weight"])


def _tensors() -> dict:
    import torch

    g = torch.Generator().manual_seed(5)
    return {"w": torch.randn(64, 8, generator=g), "b": torch.randn(8, generator=g).to(torch.bfloat16),
            "step": torch.tensor(3.0)}


def test_zstd_compressed_records(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint._extension import ZStandard

    sd = {"model": {**_tensors(), "t": _tensors()["w"].t()}}
    dcp.save(sd, storage_writer=FileSystemWriter(tmp_path / "z", _extensions=[ZStandard()]), no_dist=True)
    src = open_source(tmp_path / "z")
    assert all(c.transforms for e in src.index.tensors() for c in e.chunks)
    for name, want in sd["model"].items():
        assert bits_equal(src.read_tensor(f"model.{name}"), want), name


def test_safetensors_serialized_distcp(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    sd = {"model": _tensors()}
    writer = FileSystemWriter(tmp_path / "s", serialization_format=SerializationFormat.SAFETENSORS)
    dcp.save(sd, storage_writer=writer, no_dist=True)
    src = open_source(tmp_path / "s")
    for name, want in sd["model"].items():
        assert bits_equal(src.read_tensor(f"model.{name}"), want), name
