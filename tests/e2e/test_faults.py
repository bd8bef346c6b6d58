"""Damaged checkpoints, a full disk, Ctrl-C and a killed process: each gives a clean exit code and
a message naming the file (and key), leaves nothing that looks complete, and ``--resume``
finishes the job once the cause is fixed.

Damage is done to a copy of the real FSDP2 checkpoint. Metadata is rewritten by loading the
fixture's own ``.metadata`` with ``pickle`` (it is our file) and pickling a modified copy.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.metadata import MetadataIndex

from shardfix.api import convert
from shardfix.options import ConvertOptions
from shardfix.report import REPORT_NAME
from shardfix.sources.dcp import DcpSource
from shardfix.verify import verify_output
from tests.conftest import ROOT, bits_equal, cli_in_process, flip

VOCAB = ["--vocab-size", "1000"]
ROUTER = "model.router.weight"
EXP_AVG = "optim.state.router.weight.exp_avg"


# -- helpers ------------------------------------------------------------------------------------


cli = cli_in_process


def copy_ckpt(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def rewrite_metadata(ckpt: Path, change: Callable[[Any], None]) -> None:
    md = pickle.loads((ckpt / ".metadata").read_bytes())  # the fixture's own file
    change(md)
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))


def record(ckpt: Path, key: str, chunk: int = 0) -> tuple[Path, int, int]:
    """(file, offset, length) of one chunk record of ``key``."""
    src = DcpSource(ckpt)
    try:
        entry = next(e for e in src.index.tensors() if e.key == key)
        c = entry.chunks[chunk]
        return ckpt / c.file, c.byte_offset, c.length
    finally:
        src.close()


def tensor_data_offset(path: Path, offset: int, length: int) -> int:
    """Absolute file offset of the first tensor byte inside a record (its ``data/0`` member)."""
    with path.open("rb") as f:
        f.seek(offset)
        raw = f.read(length)
    z = zipfile.ZipFile(io.BytesIO(raw))
    info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    n, m = int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little"), int.from_bytes(
        raw[info.header_offset + 28 : info.header_offset + 30], "little")
    return offset + info.header_offset + 30 + n + m


def assert_not_complete(out: Path) -> None:
    """Nothing a loader or a person could take for a finished conversion."""
    if not out.exists():
        return
    names = {p.name for p in out.iterdir()}
    assert not any(n.endswith(".safetensors") or n.endswith(".index.json") for n in names), names
    report = out / REPORT_NAME
    if report.exists():
        assert json.loads(report.read_text())["status"] == "failed"
    try:
        problems, _ = verify_output(out)
        assert problems
    except Exception as e:  # no report at all: verify refuses
        assert "no shardfix-report.json" in str(e)


def output_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def clean(fsdp_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The output of a clean conversion: what every resumed run must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("clean") / "out"
    convert(fsdp_ckpt, out, ConvertOptions(vocab_size=1000, executor="inline"))
    return output_bytes(out)


# -- source damage found while indexing: exit 2 before anything is written --------------------


def test_truncated_distcp(fsdp_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = copy_ckpt(fsdp_ckpt, tmp_path)
    f = ckpt / "__1_0.distcp"
    os.truncate(f, f.stat().st_size - 100)
    code, err = cli(capsys, "convert", ckpt, tmp_path / "out", *VOCAB)
    assert code == 2
    assert str(f) in err and "truncated" in err and "spans bytes" in err
    assert not (tmp_path / "out").exists()


def test_missing_rank_file(fsdp_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = copy_ckpt(fsdp_ckpt, tmp_path)
    (ckpt / "__1_0.distcp").unlink()
    code, err = cli(capsys, "convert", ckpt, tmp_path / "out", *VOCAB)
    assert code == 2
    assert f"{ckpt / '__1_0.distcp'}: missing (needed for " in err
    assert not (tmp_path / "out").exists()


def _grow_router(md: Any) -> None:  # a gap: the chunks cover 131 of 132 rows
    md.state_dict_metadata[ROUTER].size = torch.Size([132, 32])


def _overlap_router(md: Any) -> None:  # the second chunk moved up one row: rows 65 and 0..65 overlap
    meta = md.state_dict_metadata[ROUTER]
    old = meta.chunks[1].offsets
    meta.chunks[1].offsets = torch.Size([old[0] - 1, 0])
    md.storage_data = {
        (MetadataIndex(mi.fqn, meta.chunks[1].offsets, mi.index) if mi.fqn == ROUTER and mi.offset == old else mi): v
        for mi, v in md.storage_data.items()
    }


def _outside_router(md: Any) -> None:
    md.state_dict_metadata[ROUTER].chunks[1].sizes = torch.Size([66, 32])


def _f64_router(md: Any) -> None:  # the records hold fp32: too few bytes for fp64 boxes
    md.state_dict_metadata[ROUTER].properties.dtype = torch.float64


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_grow_router, f"{ROUTER}: the chunks cover 4192 of 4224 elements of shape [132, 32]"),
        (_overlap_router, f"{ROUTER}: chunks at offsets [0, 0] and [65, 0] overlap"),
        (_outside_router, f"{ROUTER}: chunk at offsets [66, 0] sizes [66, 32] lies outside"),
        (_f64_router, f"record for {ROUTER} at [0, 0] holds torch.float32 [66, 32] but the metadata says torch.float64"),
    ],
    ids=["gap", "overlap", "out-of-bounds", "dtype-size"],
)
def test_bad_chunk_boxes_and_sizes(
    change: Callable[[Any], None], message: str, fsdp_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = copy_ckpt(fsdp_ckpt, tmp_path)
    rewrite_metadata(ckpt, change)
    code, err = cli(capsys, "convert", ckpt, tmp_path / "out", *VOCAB)
    assert code == 2, err
    assert message in err
    assert not (tmp_path / "out").exists()


# -- damage found while reading: exit 2, nothing complete, --resume after the fix ---------------


def _flip_record_byte(ckpt: Path) -> Path:
    path, off, length = record(ckpt, EXP_AVG, chunk=1)
    flip(path, tensor_data_offset(path, off, length) + 17)
    return path


def _shorten_record(ckpt: Path) -> Path:
    path, off, length = record(ckpt, EXP_AVG, chunk=1)

    def change(md: Any) -> None:
        for mi, info in md.storage_data.items():
            if mi.fqn == EXP_AVG and info.offset == off:
                info.length = length - 16
    rewrite_metadata(ckpt, change)
    return path


def _lengthen_record(ckpt: Path) -> Path:
    path, off, length = record(ckpt, EXP_AVG, chunk=0)

    def change(md: Any) -> None:
        for mi, info in md.storage_data.items():
            if mi.fqn == EXP_AVG and info.offset == off:
                info.length = length + 40  # runs into the next record
    rewrite_metadata(ckpt, change)
    return path


def _int32_router(ckpt: Path) -> Path:
    rewrite_metadata(ckpt, lambda md: setattr(md.state_dict_metadata[ROUTER].properties, "dtype", torch.int32))
    return record(ckpt, ROUTER)[0]


def _narrow_router(ckpt: Path) -> Path:  # the metadata says [131, 16]; the records hold [.., 32]
    def change(md: Any) -> None:
        meta = md.state_dict_metadata[ROUTER]
        meta.size = torch.Size([131, 16])
        for c in meta.chunks:
            c.sizes = torch.Size([c.sizes[0], 16])
    rewrite_metadata(ckpt, change)
    return record(ckpt, ROUTER)[0]


@pytest.mark.parametrize(
    ("damage", "key", "message"),
    [
        (_flip_record_byte, EXP_AVG, "fails its CRC-32 check"),
        (_shorten_record, EXP_AVG, "the record length in the metadata does not match the archive"),
        (_lengthen_record, EXP_AVG, "the record length in the metadata does not match the archive"),
        (_int32_router, ROUTER, "holds torch.float32 [66, 32] but the metadata says torch.int32 [66, 32]"),
        (_narrow_router, ROUTER, "holds torch.float32 [66, 32] but the metadata says torch.float32 [66, 16]"),
    ],
    ids=["flipped-byte", "short-record", "long-record", "dtype", "size"],
)
def test_damaged_record_then_resume(
    damage: Callable[[Path], Path], key: str, message: str, fsdp_ckpt: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], clean: dict[str, bytes],
) -> None:
    ckpt = copy_ckpt(fsdp_ckpt, tmp_path)
    damaged = damage(ckpt)
    out = tmp_path / "out"
    code, err = cli(capsys, "convert", ckpt, out, *VOCAB, "--executor", "inline")
    assert code == 2, err
    assert str(damaged) in err and key in err and message in err
    assert_not_complete(out)

    shutil.rmtree(ckpt)  # the fix: copy the checkpoint again
    shutil.copytree(fsdp_ckpt, ckpt)
    code, err = cli(capsys, "convert", ckpt, out, *VOCAB, "--executor", "inline", "--resume")
    assert code == 0, err
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["status"] == "complete"
    if key.startswith("optim."):  # the model file was finished before the failure; it is reused only if no
        # file it was read from changed on disk since (the flipped byte rewrote a rank file: new mtime)
        assert report["executor"]["resumed_files"] == (0 if damage is _flip_record_byte else 1)
    assert output_bytes(out) == clean
    assert verify_output(out, ckpt)[0] == []


# -- input and output paths ----------------------------------------------------------------------


def test_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "notes"
    d.mkdir()
    (d / "README.txt").write_text("hello")
    code, err = cli(capsys, "convert", d, tmp_path / "out")
    assert code == 2 and f"{d}: not a checkpoint shardfix can read" in err
    code, err = cli(capsys, "inspect", tmp_path / "nope")
    assert code == 2 and f"{tmp_path / 'nope'}: no such file or directory" in err
    (tmp_path / "x.pt").write_bytes(b"PK\x03\x04 not really a zip")
    code, err = cli(capsys, "inspect", tmp_path / "x.pt")
    assert code == 2 and f"{tmp_path / 'x.pt'}: not a readable torch.save file" in err


def test_output_exists(fsdp_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, err = cli(capsys, "convert", fsdp_ckpt, out, *VOCAB)
    assert code == 2 and f"{out}: already exists and is not empty; pass --overwrite" in err
    code, err = cli(capsys, "convert", fsdp_ckpt, out, *VOCAB, "--overwrite")
    assert code == 2 and "refusing to delete them" in err
    assert (out / "mine.txt").read_text() == "keep me"


# -- a full disk, Ctrl-C, a killed process (real subprocesses) --------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}


def _file_size_limit(limit: int) -> Callable[[], None]:
    def pre() -> None:  # runs in the child before exec: writes past `limit` bytes fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return pre


@pytest.mark.slow
def test_disk_full_then_resume(fsdp_ckpt: Path, tmp_path: Path, clean: dict[str, bytes]) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "shardfix", "convert", str(fsdp_ckpt), str(out), *VOCAB, "--executor", "inline"]
    # model.safetensors (350 KB) fits under the limit; optimizer.safetensors (700 KB) does not.
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300,
                       preexec_fn=_file_size_limit(500_000))
    assert p.returncode == 2, p.stderr
    assert "optimizer.safetensors: cannot write" in p.stderr and "File too large" in p.stderr
    assert "--resume" in p.stderr and "Traceback" not in p.stderr
    assert_not_complete(out)
    assert not list(out.rglob(".*.tmp-*")), "a partial temporary file was left behind"

    p = subprocess.run([*cmd, "--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["status"] == "complete" and report["executor"]["resumed_files"] == 1
    assert output_bytes(out) == clean


def _many_files_checkpoint(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    model = {f"layers.{i}.weight": torch.randn(16, 16, generator=gen) for i in range(600)}
    path = tmp_path / "many.pt"
    torch.save({"model": model}, path)
    return path, model


def _wait_for_done(out: Path, more_than: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = len(list((out / ".shardfix-staging").glob("*.done.json"))) if (out / ".shardfix-staging").is_dir() else 0
        if n > more_than:
            return n
        assert proc.poll() is None, f"conversion ended before it could be interrupted: {proc.communicate()}"
        time.sleep(0.01)
    raise AssertionError("conversion made no progress")


@pytest.mark.slow
def test_ctrl_c_and_kill_then_resume(tmp_path: Path) -> None:
    src, model = _many_files_checkpoint(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "shardfix", "convert", str(src), str(out), "--max-shard-size", "1KiB",
           "--executor", "inline", "--no-progress"]

    # Ctrl-C mid-run: a clear message, exit 130, a failed report, no complete-looking output.
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = _wait_for_done(out, 3, p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "interrupted; rerun convert with --resume to finish" in err and "Traceback" not in err
    assert_not_complete(out)
    assert "interrupted" in json.loads((out / REPORT_NAME).read_text())["error"]

    # The process killed outright (SIGKILL: no handler runs) while resuming.
    p = subprocess.Popen([*cmd, "--resume"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_done(out, first + 3, p)
    p.kill()
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert_not_complete(out)

    p = subprocess.run([*cmd, "--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["status"] == "complete" and report["executor"]["resumed_files"] > first
    assert verify_output(out)[0] == []
    from safetensors import safe_open

    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(index) == sorted(model)
    for name, fname in index.items():
        with safe_open(str(out / fname), framework="pt") as h:
            assert bits_equal(h.get_tensor(name), model[name])
