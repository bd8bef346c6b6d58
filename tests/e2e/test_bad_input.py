"""Crafted inputs through the CLI: one exit-2 message (or a correct, warned result), bounded memory and time.

Each input is built for real (real symlinks, FIFOs, zstd frames, zips, pickled torch metadata).
Commands run in a subprocess so their peak memory can be measured with ``resource.getrusage``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import ROOT
from tests.sources import crafted_inputs as ci

GB = 1 << 30
Cap = pytest.CaptureFixture[str]
slow = pytest.mark.slow  # the tests that spawn shardfix in a subprocess (memory, time, or a FIFO that could block)


def cli(capsys: Cap, *args: str | Path) -> tuple[int, str, str]:
    """Run the CLI in this process; return (exit code, stdout, stderr)."""
    from shardfix.cli import main

    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse's usage errors
        rc = int(e.code or 0)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def shardfix(*args: str | Path, timeout: float = 60) -> tuple[int, str, str, float, int]:
    """Run the CLI; return (exit code, stdout, stderr, seconds, peak RSS bytes of the child)."""
    code = ("import resource, sys, runpy; sys.argv = ['shardfix', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('shardfix', run_name='__main__')\n"
            "finally:\n    print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                       env=env, stdin=subprocess.DEVNULL)
    took = time.perf_counter() - t0
    rss = [int(line.split()[1]) * 1024 for line in p.stderr.splitlines() if line.startswith("MAXRSS")]
    err = "\n".join(line for line in p.stderr.splitlines() if not line.startswith("MAXRSS"))
    return p.returncode, p.stdout, err, took, (rss[0] if rss else 0)


def one_message(err: str, *needles: str) -> None:
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines and lines[0].startswith("shardfix: error:"), err
    assert "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


@pytest.fixture()
def st_ckpt(tmp_path: Path) -> Path:
    d = tmp_path / "ck"
    d.mkdir()
    save_file({"embed.weight": torch.randn(8, 4)}, d / "model.safetensors")
    return d


# -- never read outside the checkpoint ------------------------------------------------------------

def test_symlink_out_of_checkpoint_refused_then_followed(capsys: Cap, st_ckpt: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    save_file({"secret": torch.arange(4.0)}, outside / "x.safetensors")
    (st_ckpt / "more.safetensors").symlink_to(outside / "x.safetensors")
    for cmd in ("inspect", "plan"):
        rc, _, err = cli(capsys, cmd, st_ckpt)
        assert rc == 2
        one_message(err, "more.safetensors", "outside the checkpoint", "--follow-symlinks")
    rc, _, err = cli(capsys, "convert", st_ckpt, tmp_path / "out")
    assert rc == 2 and not (tmp_path / "out").exists()
    one_message(err, "more.safetensors")
    rc, out, err = cli(capsys, "convert", st_ckpt, tmp_path / "out", "--follow-symlinks", "--no-progress", "--executor", "inline")
    assert rc == 0, err
    report = json.loads((tmp_path / "out" / "shardfix-report.json").read_text())
    assert any(str(outside / "x.safetensors") in n for n in report["source"]["notes"])
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["secret"], torch.arange(4.0))


def test_symlink_inside_checkpoint_is_fine(capsys: Cap, st_ckpt: Path) -> None:
    (st_ckpt / "sub").mkdir()
    save_file({"b": torch.ones(2)}, st_ckpt / "sub" / "b.safetensors")
    (st_ckpt / "b.safetensors").symlink_to(st_ckpt / "sub" / "b.safetensors")
    rc, _, err = cli(capsys, "plan", st_ckpt)
    assert rc == 0, err


@slow
@pytest.mark.parametrize("name", ["model-00002.safetensors", ".metadata", "rank_1.pt"])
def test_fifo_where_a_file_is_expected(tmp_path: Path, name: str) -> None:
    d = tmp_path / "ck"
    d.mkdir()
    save_file({"w": torch.ones(2)}, d / "model-00001.safetensors")
    torch.save({"w": torch.ones(2)}, d / "rank_0.pt")
    os.mkfifo(d / name)
    for cmd in ("inspect", "plan") if name == ".metadata" else ("plan",):
        rc, _, err, took, _ = shardfix(cmd, d, timeout=30)
        assert rc == 2 and took < 20
        one_message(err, name, "FIFO")
    if name == ".metadata":
        rc, _, err, _, _ = shardfix("convert", d, tmp_path / "out", timeout=30)
        assert rc == 2
        one_message(err, name)


@slow
def test_fifo_or_device_as_the_checkpoint_or_behind_a_link(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "model.safetensors")
    rc, _, err, _, _ = shardfix("inspect", tmp_path / "model.safetensors", timeout=30)
    assert rc == 2
    one_message(err, "FIFO")
    d = tmp_path / "ck"
    d.mkdir()
    (d / "model.safetensors").symlink_to("/dev/zero")
    rc, _, err, _, _ = shardfix("plan", d, timeout=30)
    assert rc == 2
    one_message(err, "model.safetensors", "character device")


# -- never drop or break silently -----------------------------------------------------------------

def test_dunder_names_are_written_and_in_the_ledger(capsys: Cap, tmp_path: Path) -> None:
    d = tmp_path / "ck"
    d.mkdir()
    tensors = {"__private": torch.arange(3.0), "w": torch.ones(2)}
    save_file(tensors, d / "model.safetensors")
    rc, _, err = cli(capsys, "convert", d, tmp_path / "out", "--no-progress", "--executor", "inline")
    assert rc == 0, err
    back = load_file(tmp_path / "out" / "model.safetensors")
    assert set(back) == set(tensors) and torch.equal(back["__private"], tensors["__private"])
    ledger = {e["source"] for e in json.loads((tmp_path / "out" / "shardfix-report.json").read_text())["ledger"]}
    assert ledger == set(tensors)


@pytest.mark.parametrize("key", ["__metadata__", "w\ud800"])
def test_names_safetensors_cannot_hold(capsys: Cap, tmp_path: Path, key: str) -> None:
    torch.save({key: torch.ones(2), "w": torch.ones(2)}, tmp_path / "m.pt")
    rc, _, err = cli(capsys, "convert", tmp_path / "m.pt", tmp_path / "out")
    assert rc == 2 and not list((tmp_path / "out").glob("*.safetensors")) if (tmp_path / "out").exists() else rc == 2
    one_message(err, "rename the key")


@slow
def test_escape_sequences_in_keys_are_escaped_everywhere(tmp_path: Path) -> None:
    evil = "\x1b]0;pwned\x07\x1b[2J"
    torch.save({"model": {f"w{evil}": torch.ones(2)}, "step": float("nan")}, tmp_path / "m.pt")
    for args in (("inspect", tmp_path / "m.pt"), ("plan", tmp_path / "m.pt"),
                 ("convert", tmp_path / "m.pt", tmp_path / "out", "--no-progress")):
        rc, out, err, _, _ = shardfix(*args)
        assert rc == 0, err
        assert "\x1b" not in out and "\x07" not in out and "\x1b" not in err, (args, out, err)
    report = (tmp_path / "out" / "shardfix-report.json").read_text()
    json.loads(report, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


# -- one message, exit 2 ----------------------------------------------------------------------------

def _raw_st(path: Path, header: object, data: bytes = b"") -> Path:
    body = (header if isinstance(header, bytes) else json.dumps(header).encode())
    body += b" " * (-len(body) % 8)
    path.write_bytes(len(body).to_bytes(8, "little") + body + data)
    return path


MALFORMED = {
    "overlap": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "overlap"),
    "non-numeric-offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, "data_offsets"),
    "nan-shape": (b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', "shape"),
    "negative-shape": ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "shape"),
    "non-object-entry": ({"a": [1, 2, 3]}, "not an object"),
    "not-json": (b"{nope", "corrupt safetensors header"),
    "past-the-end": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "truncated"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_safetensors_header(capsys: Cap, tmp_path: Path, case: str) -> None:
    header, needle = MALFORMED[case]
    f = _raw_st(tmp_path / "model.safetensors", header, b"\0" * 12)
    for cmd in ("inspect", "plan"):
        rc, _, err = cli(capsys, cmd, f)
        assert rc == 2, err
        one_message(err, "model.safetensors", needle)


def test_deep_dict_and_huge_vocab(capsys: Cap, tmp_path: Path) -> None:
    f = ci.deep_dict_pt(tmp_path / "deep.pt")
    rc, _, err = cli(capsys, "plan", f)
    assert rc == 2
    one_message(err, "deep.pt", "nested")
    torch.save({"model": {"embed.weight": torch.ones(8, 2)}}, tmp_path / "m.pt")
    for v in ("1e23", "100000000000000000000000", "30000000"):
        rc, _, err = cli(capsys, "plan", tmp_path / "m.pt", "--vocab-size", v, "--allow-grow")
        assert rc == 2, (v, err)
        one_message(err, "vocab")


# -- cost bounded by the input ------------------------------------------------------------------------

def bounded(result: tuple[int, str, str, float, int], *needles: str) -> None:
    rc, _, err, took, rss = result
    assert rc == 2, err
    one_message(err, *needles)
    assert rss < GB, f"peak RSS {rss / GB:.2f} GiB"
    assert took < 30, f"{took:.1f} s"


@slow
def test_zstd_bomb_record(tmp_path: Path) -> None:
    pytest.importorskip("zstandard", reason="the zstd bomb needs the zstandard package to build")
    d = ci.zstd_bomb_dcp(tmp_path / "ck")
    assert sum(f.stat().st_size for f in d.iterdir()) < 200_000
    for cmd in ("inspect", "plan"):
        rc, _, err, took, rss = shardfix(cmd, d)
        assert rc == 0 and rss < GB, (err, rss)
    bounded(shardfix("convert", d, tmp_path / "out", "--executor", "inline", "--no-progress"), "expands past")


@slow
def test_deflated_pickle_in_pt(tmp_path: Path) -> None:
    f = ci.deflated_pickle_pt(tmp_path / "bomb.pt")
    assert f.stat().st_size < 16 << 20  # deflate level 1: ~9 MB for 2 GiB (level 9 reaches 2 MB, slowly)
    for cmd in ("inspect", "plan"):
        bounded(shardfix(cmd, f), "bomb.pt", "expand")


@slow
def test_stride0_record_is_not_materialised_by_plan(tmp_path: Path) -> None:
    d = ci.stride0_dcp(tmp_path / "ck")
    for cmd in ("inspect", "plan"):
        rc, out, err, took, rss = shardfix(cmd, d)
        assert rc == 0 and rss < GB // 2 and took < 30, (err, rss)
    assert "declares far more than it stores" in out + err


@slow
def test_memoised_chunk_lists(tmp_path: Path) -> None:
    d = ci.memo_chunk_metadata(tmp_path / "ck")
    assert (d / ".metadata").stat().st_size < 100_000
    bounded(shardfix("plan", d), ".metadata", "chunk boxes")


@slow
def test_absurd_rank_number(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    d.mkdir()
    torch.save({"w": torch.ones(2)}, d / "rank_30000000.pt")
    result = shardfix("plan", d)
    bounded(result, "missing", "30,000,000 in all")
    err = result[2]
    assert len(err) < 5000


@slow
def test_safetensors_declaring_more_than_it_holds(tmp_path: Path) -> None:
    f = ci.big_declared_safetensors(tmp_path / "model.safetensors")
    assert f.stat().st_size < 200
    bounded(shardfix("convert", f, tmp_path / "out"), "model.safetensors", "truncated")
    assert not (tmp_path / "out").exists() or sum(p.stat().st_size for p in (tmp_path / "out").rglob("*")) < 1 << 20


def test_shared_storage_warns(capsys: Cap, tmp_path: Path) -> None:
    s = torch.zeros(1 << 18)
    torch.save({f"w{i}": s for i in range(300)}, tmp_path / "shared.pt")
    rc, out, err = cli(capsys, "plan", tmp_path / "shared.pt")
    assert rc == 0, err
    assert "declares far more than it stores" in out
