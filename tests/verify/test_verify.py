"""``shardfix verify``: every flipped byte is caught and named, every problem is listed, and
``--against`` recomputes each tensor from the source through the ops the report recorded."""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardfix.api import convert
from shardfix.cli import main as cli_main
from shardfix.errors import BadInputError
from shardfix.options import ConvertOptions
from shardfix.outputs.writer import file_checksum
from shardfix.report import REPORT_NAME
from shardfix.verify import verify_output
from tests.conftest import flip


@pytest.fixture(scope="module")
def converted(fsdp_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A multi-file conversion (model and optimizer both sharded, with index files)."""
    out = tmp_path_factory.mktemp("verify") / "out"
    convert(fsdp_ckpt, out, ConvertOptions(vocab_size=1000, max_shard_size="200KB", executor="inline"))
    assert len(list(out.glob("model-*.safetensors"))) > 1 and len(list(out.glob("optimizer-*.safetensors"))) > 1
    return out


@pytest.fixture
def out(converted: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "out"
    shutil.copytree(converted, dst)
    return dst


def tensors(out: Path) -> list[tuple[Path, str, int, int]]:
    """(file, tensor, absolute start, end) of every non-empty tensor in the output."""
    rows = []
    for f in sorted(out.glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__" and info["data_offsets"][1] > info["data_offsets"][0]:
                s, e = info["data_offsets"]
                rows.append((f, name, 8 + n + s, 8 + n + e))
    return rows


def test_clean_output_verifies(converted: Path, fsdp_ckpt: Path) -> None:
    problems, stats = verify_output(converted, fsdp_ckpt)
    assert problems == []
    report = json.loads((converted / REPORT_NAME).read_text())
    assert stats["tensors"] == stats["compared"] == sum(len(f["tensors"]) for f in report["outputs"]["files"])


def test_every_tensor_flipped_byte_is_named(out: Path) -> None:
    """The first, last and a random byte of every tensor, one at a time: named by file and tensor."""
    rng = random.Random(0)
    rows = tensors(out)
    assert len(rows) >= 80
    for path, name, start, end in rows:
        for at in sorted({start, end - 1, rng.randrange(start, end)}):
            mask = 1 << rng.randrange(8)
            flip(path, at, mask)
            problems, _ = verify_output(out)
            flip(path, at, mask)  # restore
            assert all(p.startswith(f"{path}: ") for p in problems), problems
            assert any(p.startswith(f"{path}: tensor {name}: checksum") for p in problems), (name, at, problems)
            assert any(p.startswith(f"{path}: file checksum") for p in problems)
    assert verify_output(out)[0] == []


def test_against_names_the_element(out: Path, fsdp_ckpt: Path) -> None:
    path, name, start, end = next(r for r in tensors(out) if r[1] == "lm_head.weight")
    flip(path, start + 4 * 37 + 2, 0x10)  # F32: element 37
    problems, _ = verify_output(out, fsdp_ckpt)
    assert f"{path}: tensor lm_head.weight: differs from model.lm_head.weight in the source after the planned ops " \
           "(1 bytes differ; first at element 37)" in problems


def test_against_catches_a_wrong_output_with_a_matching_report(out: Path, fsdp_ckpt: Path) -> None:
    """A report whose checksums describe wrong bytes passes the self-check; only --against sees it."""
    path, name, start, end = next(r for r in tensors(out) if r[1] == "embed.weight")
    flip(path, start + 8, 0x01)
    report = json.loads((out / REPORT_NAME).read_text())
    f = next(f for f in report["outputs"]["files"] if f["name"] == path.name)
    t = next(t for t in f["tensors"] if t["name"] == name)
    t["checksum"] = xxhash.xxh3_64_hexdigest(path.read_bytes()[start:end])
    f["checksum"] = file_checksum(path)
    (out / REPORT_NAME).write_text(json.dumps(report))
    assert verify_output(out)[0] == []
    problems, _ = verify_output(out, fsdp_ckpt)
    assert problems == [f"{path}: tensor embed.weight: differs from model.embed.weight in the source after the "
                        "planned ops (1 bytes differ; first at element 2)"]


def test_header_damage_still_checks_tensors(out: Path) -> None:
    path, name, start, end = tensors(out)[0]
    flip(path, 20, 0x40)  # inside the JSON header
    flip(path, start, 0x01)  # and a tensor byte
    problems, _ = verify_output(out)
    assert any(p.startswith(f"{path}: header unreadable") for p in problems)
    assert any(p.startswith(f"{path}: tensor {name}: checksum") for p in problems)
    assert any(p.startswith(f"{path}: the safetensors library refuses it") for p in problems)


def test_every_problem_is_listed(out: Path, fsdp_ckpt: Path) -> None:
    rows = tensors(out)
    model_file = next(r for r in rows if r[0].name.startswith("model-"))
    optim_file = next(r for r in rows if r[0].name.startswith("optimizer-"))
    flip(model_file[0], model_file[2])
    flip(optim_file[0], optim_file[3] - 1)
    missing = sorted(out.glob("optimizer-*.safetensors"))[-1]
    missing.unlink()
    (out / "model-99999-of-99999.safetensors").write_bytes(b"stray")
    (out / ".shardfix-staging").mkdir()
    idx = out / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    dropped = sorted(data["weight_map"])[0]
    del data["weight_map"][dropped]
    data["metadata"]["total_size"] += 1
    idx.write_text(json.dumps(data))
    report = json.loads((out / REPORT_NAME).read_text())
    report["ledger"] = [e for e in report["ledger"] if e["source"] != "model.gate"]
    (out / REPORT_NAME).write_text(json.dumps(report))

    problems, _ = verify_output(out, fsdp_ckpt)
    expected = [
        f"{model_file[0]}: tensor {model_file[1]}: checksum",
        f"{optim_file[0]}: tensor {optim_file[1]}: checksum",
        f"{missing}: missing",
        f"{out / 'model-99999-of-99999.safetensors'}: not in the report",
        f"{out / '.shardfix-staging'}: an interrupted run's staging area",
        f"model.safetensors.index.json: does not map {dropped}",
        "model.safetensors.index.json: total_size",
        "tensor gate has no ledger entry producing it",
        "ledger: source entry model.gate appears 0 times",
    ]
    for e in expected:
        assert any(e in p for p in problems), (e, problems)


def test_failed_report_and_truncated_file(out: Path) -> None:
    report = json.loads((out / REPORT_NAME).read_text())
    report["status"], report["error"] = "failed", "disk full"
    (out / REPORT_NAME).write_text(json.dumps(report))
    victim = sorted(out.glob("model-*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    problems, _ = verify_output(out)
    assert any("status is 'failed', not 'complete' (disk full)" in p for p in problems)
    assert any(p.startswith(f"{victim}: ") and "bytes, the report says" in p for p in problems)
    assert any(p.startswith(f"{victim}: tensor ") for p in problems)


def test_not_an_output(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no shardfix-report.json"):
        verify_output(tmp_path)
    (tmp_path / REPORT_NAME).write_text("{not json")
    with pytest.raises(BadInputError, match="not readable JSON"):
        verify_output(tmp_path)


def test_cli_exit_codes(out: Path, fsdp_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["verify", str(out), "--against", str(fsdp_ckpt)]) == 0
    assert "OK" in capsys.readouterr().out
    path, name, start, _ = tensors(out)[3]
    flip(path, start)
    assert cli_main(["verify", str(out)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert f"problem: {path}: tensor {name}: checksum" in "\n".join(lines)
    assert lines[-1].startswith(f"verify {out}: 2 problem(s)")
    assert cli_main(["verify", str(out), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and len(doc["problems"]) == 2
    assert cli_main(["verify", str(out.parent)]) == 2


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_any_flipped_byte_anywhere_in_a_file_is_caught(converted: Path, tmp_path: Path, where: float, bit: int) -> None:
    """Header, padding or data: any single flipped bit is a problem naming the file."""
    out = tmp_path / "h"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(converted, out)
    path = sorted(out.glob("*.safetensors"))[0]
    at = int(where * path.stat().st_size)
    flip(path, at, 1 << bit)
    problems, _ = verify_output(out)
    assert problems and any(p.startswith(f"{path}:") for p in problems)
    inside = [r for r in tensors(converted) if r[0].name == path.name and r[2] <= at < r[3]]
    for _, name, _, _ in inside:
        assert any(f"{path}: tensor {name}:" in p for p in problems)
