"""Crafted pickles against every place shardfix unpickles: DCP ``.metadata``, DCP records and
bytes entries, torch.save files. Each payload would create a marker file if it ran; every test
asserts the marker does not exist, and that the refusal is a clean ``ShardfixError``."""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING, Metadata, TensorStorageMetadata
from torch.serialization import _get_layout

from shardfix.errors import BadInputError, ShardfixError, UnsafeInputError
from shardfix.io.safe_pickle import MAX_METADATA_BYTES, load_metadata_pickle, loads_metadata
from shardfix.sources.dcp import DcpSource
from shardfix.sources.records import decode_record
from shardfix.sources.torchsave import load_torch_file
from tests import crafted
from tests.conftest import ROOT, run_cli


@pytest.fixture
def marker(tmp_path: Path):
    m = tmp_path / "PAYLOAD-RAN"
    yield m
    assert not m.exists(), "a crafted pickle ran its payload"


@pytest.mark.parametrize("name", sorted(crafted.PAYLOADS))
def test_metadata_payload_refused(name: str, marker: Path, tmp_path: Path) -> None:
    path = tmp_path / ".metadata"
    path.write_bytes(crafted.PAYLOADS[name](marker))
    with pytest.raises(UnsafeInputError, match=r"refuses to load global .*Nothing in it was executed") as e:
        load_metadata_pickle(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(("module", "name"), crafted.UNEXPECTED_GLOBALS)
def test_metadata_unexpected_global_refused(module: str, name: str, marker: Path) -> None:
    with pytest.raises(UnsafeInputError, match=f"global {module}.{name}"):
        loads_metadata(crafted.module_global(module, name, marker), "x/.metadata")


def test_payload_nested_deep_inside_genuine_metadata(fsdp_ckpt: Path, marker: Path, tmp_path: Path) -> None:
    """A genuine metadata structure with one chunk's sizes replaced by a payload."""
    md = pickle.loads((fsdp_ckpt / ".metadata").read_bytes())  # our own fixture: trusted
    meta = md.state_dict_metadata["model.router.weight"]
    meta.chunks[1].sizes = crafted.Reduce(os.system, f"touch {marker}")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(fsdp_ckpt, ckpt)
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(UnsafeInputError, match="posix.system"):
        DcpSource(ckpt)


@pytest.mark.parametrize("name", sorted(crafted.pollution_pickles()))
def test_build_cannot_rewrite_shared_objects(name: str) -> None:
    """``BUILD`` on an allowed class, function or singleton must not change it for the process."""
    before = (pathlib.PosixPath.__dict__.get("_str"), Metadata.__doc__, _MEM_FORMAT_ENCODING(0)._name_,
              dict(_get_layout.__dict__), str(pathlib.PosixPath("/a/b")))
    try:
        loads_metadata(crafted.pollution_pickles()[name], "x/.metadata")
    except ShardfixError:
        pass  # refusing is fine too; what matters is that nothing shared changed
    after = (pathlib.PosixPath.__dict__.get("_str"), Metadata.__doc__, _MEM_FORMAT_ENCODING(0)._name_,
             dict(_get_layout.__dict__), str(pathlib.PosixPath("/a/b")))
    assert after == before
    assert str(pathlib.PosixPath("/a/b")) == "/a/b"


def test_genuine_metadata_loads_as_metadata(fsdp_ckpt: Path) -> None:
    md = load_metadata_pickle(fsdp_ckpt / ".metadata")
    assert isinstance(md, Metadata)
    meta = md.state_dict_metadata["model.router.weight"]
    assert isinstance(meta, TensorStorageMetadata)
    assert meta.properties.dtype == torch.float32 and list(meta.size) == [131, 32]
    assert type(md) is not Metadata  # a private per-load subclass, never the shared class


def test_oversized_metadata_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / ".metadata"
    with path.open("wb") as f:  # sparse: no disk space used
        f.truncate(MAX_METADATA_BYTES + 1)
    with pytest.raises(BadInputError, match="far larger than any DCP metadata file"):
        load_metadata_pickle(path)


@pytest.mark.parametrize("kind", ["list", "tuple", "dict"])
def test_deeply_nested_metadata_is_a_clean_error(kind: str, tmp_path: Path) -> None:
    depth = 200_000
    if kind == "list":
        data = b"\x80\x04" + b"]" * depth + b"a" * (depth - 1) + b"."
    elif kind == "tuple":
        data = b"\x80\x04" + b"(" * depth + b")" + b"t" * depth + b"."
    else:
        data = b"\x80\x04" + b"}K\x00" * (depth - 1) + b"}" + b"s" * (depth - 1) + b"."
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / ".metadata").write_bytes(data)
    with pytest.raises(BadInputError, match="not DCP Metadata|not a readable DCP metadata pickle"):
        DcpSource(ckpt)


@pytest.mark.parametrize("data", [b"", b"\x80", b"not a pickle at all", b"\x80\x04\x95\xff\xff\xff\xff\x00\x00\x00\x00"])
def test_truncated_or_garbage_metadata(data: bytes, tmp_path: Path) -> None:
    path = tmp_path / ".metadata"
    path.write_bytes(data)
    with pytest.raises(BadInputError, match=str(path)):
        load_metadata_pickle(path)


# -- records, bytes entries and torch.save files: weights_only=True ------------------------------


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_record_with_payload_refused(name: str, marker: Path) -> None:
    obj = crafted.Reduce(os.system, f"touch {marker}") if name == "os.system" else (
        crafted.Reduce(eval, f"open({str(marker)!r}, 'w').close()") if name == "builtins.eval"
        else crafted.Reduce(__import__("subprocess").Popen, ["touch", str(marker)]))
    raw = crafted.torch_save_bytes({"t": torch.zeros(2), "x": obj})
    with pytest.raises(UnsafeInputError, match="weights_only=True"):
        decode_record(raw, (), Path("ckpt/__0_0.distcp"), "model.w")


def test_dcp_bytes_entry_with_payload_is_refused_not_run(marker: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    payload = crafted.Reduce(os.system, f"touch {marker}")
    dcp.save({"model": {"w": torch.arange(6.0).reshape(2, 3)}, "extra": payload}, checkpoint_id=str(ckpt), no_dist=True)
    src = DcpSource(ckpt)
    extra = next(e for e in src.index.objects() if e.key == "extra")
    assert extra.value is None and "refused" in extra.type_name and "posix.system" in extra.type_name
    assert any("--trust-pickle" in n for n in src.index.notes)
    assert torch.equal(src.read_tensor("model.w"), torch.arange(6.0).reshape(2, 3))


def test_torch_save_with_payload_refused(marker: Path, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    path.write_bytes(crafted.torch_save_bytes({"model": {"w": torch.ones(2)}, "x": crafted.Reduce(os.system,
                                                                                                  f"touch {marker}")}))
    with pytest.raises(UnsafeInputError, match=r"posix\.system.*nothing in the file ran.*--trust-pickle"):
        load_torch_file(path)


@pytest.mark.slow
def test_cli_refuses_crafted_metadata_with_exit_2(marker: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / ".metadata").write_bytes(crafted.os_system(marker))
    r = run_cli("inspect", ckpt)
    assert r.code == 2, r.err
    assert "refuses to load global posix.system" in r.err and str(ckpt / ".metadata") in r.err
    assert "Traceback" not in r.err


# -- --trust-pickle: an explicit opt-in, with a warning and a note in the report ------------------


def _custom_class_checkpoint(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    model = {"embed.weight": torch.randn(8, 4), "head.weight": torch.randn(8, 4)}
    path = tmp_path / "custom.pt"
    torch.save({"model": model, "optimizer": crafted.TrainerState(step=7)}, path)
    return path, model


@pytest.mark.slow
def test_custom_class_checkpoint_refused_then_trusted(tmp_path: Path) -> None:
    path, model = _custom_class_checkpoint(tmp_path)
    env = {"PYTHONPATH": str(ROOT)}  # the class is tests.crafted.TrainerState
    r = run_cli("convert", path, tmp_path / "out", env=env)
    assert r.code == 2
    assert "crafted.TrainerState" in r.err and "runs whatever code the file names" in r.err
    assert "--trust-pickle" in r.err and not (tmp_path / "out").exists()

    r = run_cli("convert", path, tmp_path / "out", "--trust-pickle", env=env)
    assert r.code == 0, r.err
    assert "warning: --trust-pickle:" in r.err and "full unpickling" in r.err
    import json

    report = json.loads((tmp_path / "out" / "shardfix-report.json").read_text())
    assert report["options"]["trust_pickle"] is True
    assert any(w.startswith("--trust-pickle:") and str(path) in w for w in report["warnings"])
    from safetensors.torch import load_file

    out = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(out[k], v) for k, v in model.items())


def test_trusted_dcp_bytes_entry_is_read_and_noted(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    dcp.save({"model": {"w": torch.ones(3)}, "trainer": crafted.TrainerState(step=3)}, checkpoint_id=str(ckpt),
             no_dist=True)
    refused = DcpSource(ckpt)
    assert next(e for e in refused.index.objects() if e.key == "trainer").value is None
    trusted = DcpSource(ckpt, trust_pickle=True)
    assert next(e for e in trusted.index.objects() if e.key == "trainer").value == crafted.TrainerState(step=3)
    assert any(n.startswith("--trust-pickle:") and "trainer" in n for n in trusted.index.notes)


def test_metadata_has_no_trust_opt_in(tmp_path: Path, marker: Path) -> None:
    """--trust-pickle never applies to .metadata: it stays allowlist-only."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / ".metadata").write_bytes(crafted.builtins_exec(marker))
    with pytest.raises(UnsafeInputError):
        DcpSource(ckpt, trust_pickle=True)


def test_loads_metadata_accepts_buffers() -> None:
    data = pickle.dumps(torch.Size([2, 3]))
    assert loads_metadata(memoryview(data)) == torch.Size([2, 3])
    assert loads_metadata(io.BytesIO(data).getvalue()) == torch.Size([2, 3])
