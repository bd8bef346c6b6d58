"""The output directory is never destroyed, mixed or made to look complete: foreign files, SRC/OUT
overlaps, a planted staging symlink, a second real process, a disk that fills on a real tmpfs, a
resume against a different source, and ``--strict``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shardfix.cli import main as cli_main
from shardfix.outputs.manifest import MANIFEST_NAME
from shardfix.report import REPORT_NAME
from shardfix.verify import verify_output
from tests.conftest import ROOT, bits_equal, cli_in_process


def _state(seed: int, n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.weight": torch.randn(16, 8, generator=g) for i in range(n)}


def _ckpt(where: Path, seed: int = 0, n: int = 6) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    torch.save(_state(seed, n), where / "model.pt")
    return where / "model.pt"


cli = cli_in_process


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and not p.is_symlink()}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}


INLINE = ["--executor", "inline", "--no-progress"]


def test_foreign_files_are_refused_kept_or_never_replaced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _ckpt(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"user": true}')
    (out / "notes.txt").write_text("mine")
    for flags in ([], ["--overwrite"], ["--resume"]):
        code, err = cli(capsys, "convert", src, out, *INLINE, *flags)
        assert code == 2 and "config.json" in err and "notes.txt" in err, err
    code, err = cli(capsys, "convert", src, out, *INLINE, "--keep-foreign")
    assert code == 0, err
    assert (out / "config.json").read_text() == '{"user": true}' and (out / "notes.txt").read_text() == "mine"
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert {"model.safetensors", REPORT_NAME} <= set(manifest["files"]) and "notes.txt" not in manifest["files"]
    code, err = cli(capsys, "convert", src, out, *INLINE, "--overwrite", "--keep-foreign")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"
    # a file shardfix wrote but the user edited is no longer provably ours: never deleted
    with (out / "model.safetensors").open("r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x7f")
    edited = (out / "model.safetensors").read_bytes()
    code, err = cli(capsys, "convert", src, out, *INLINE, "--overwrite", "--keep-foreign")
    assert code == 2 and "model.safetensors" in err and "would write a file of that name" in err, err
    assert (out / "model.safetensors").read_bytes() == edited


@pytest.mark.parametrize("name", [REPORT_NAME, "model.safetensors"])
def test_a_lookalike_file_is_not_shardfixs(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _ckpt(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(b"")  # an empty report once made --overwrite delete everything
    (out / "work.txt").write_text("unrelated")
    for flags in (["--overwrite"], ["--resume"], ["--overwrite", "--keep-foreign"], ["--resume", "--keep-foreign"]):
        code, err = cli(capsys, "convert", src, out, *INLINE, *flags)
        assert code == 2 and name in err, err
        assert (out / name).read_bytes() == b"" and (out / "work.txt").read_text() == "unrelated"


def test_src_and_out_overlap_is_refused_whatever_the_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _ckpt(tmp_path / "ckpt")
    d = src.parent
    st = _ckpt(tmp_path / "st")
    cli(capsys, "convert", st, tmp_path / "stout", *INLINE)
    st_file = tmp_path / "stout" / "model.safetensors"
    before = _tree(tmp_path)
    cases = [(d, d), (d, d / "out"), (d, tmp_path), (src, d), (st_file, st_file.parent)]
    for s, o in cases:
        for flags in ([], ["--overwrite"], ["--resume", "--dtype", "bf16"], ["--overwrite", "--keep-foreign"]):
            code, err = cli(capsys, "convert", s, o, *INLINE, *flags)
            assert code == 2, (s, o, flags, err)
    assert _tree(tmp_path) == before  # no source byte changed, nothing created
    assert not (d / "out").exists()


def test_planted_staging_is_never_written_through(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _ckpt(tmp_path / "src")
    out = tmp_path / "out"
    cli(capsys, "convert", src, out, *INLINE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / ".shardfix-staging").symlink_to(elsewhere)
    for flags in (["--overwrite"], ["--resume"]):
        code, err = cli(capsys, "convert", src, out, *INLINE, *flags)
        assert code == 2 and ".shardfix-staging" in err and "symlink" in err, err
    assert list(elsewhere.iterdir()) == []
    (out / ".shardfix-staging").unlink()
    # a real directory shardfix did not create (a fresh OUT with only a staging dir in it)
    other = tmp_path / "other"
    (other / ".shardfix-staging").mkdir(parents=True)
    code, err = cli(capsys, "convert", src, other, *INLINE, "--resume")
    assert code == 2 and "not created by shardfix" in err, err


@pytest.mark.slow
def test_a_second_run_into_the_same_out_is_refused(tmp_path: Path) -> None:
    src = _ckpt(tmp_path / "src", n=24)  # 12 files, 1.5 s each: the first run outlasts three CLI starts
    out = tmp_path / "out"
    first = subprocess.Popen(
        [sys.executable, "-c", "import sys; from shardfix.api import convert; from shardfix.execute import Faults; "
         "from shardfix.options import ConvertOptions; "
         "convert(sys.argv[1], sys.argv[2], ConvertOptions(executor='inline', max_shard_size='1KiB', progress=False), "
         "faults=Faults(delay=1.5))", str(src), str(out)],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((out / ".shardfix-staging").glob("*.done.json")):
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.05)
    for flags in ([], ["--resume"], ["--overwrite"]):
        p = subprocess.run([sys.executable, "-m", "shardfix", "convert", str(src), str(out), *INLINE,
                            "--max-shard-size", "1KiB", *flags], env=_env(), capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 2 and f"another shardfix run (pid {first.pid})" in p.stderr, p.stderr
    assert first.wait(timeout=300) == 0, first.communicate()
    assert verify_output(out, src)[0] == []


@pytest.mark.slow
def test_resume_never_mixes_two_sources(tmp_path: Path) -> None:
    src = _ckpt(tmp_path / "src", seed=1000, n=12)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "shardfix", "convert", str(src), str(out), *INLINE, "--max-shard-size", "1KiB"]
    p = subprocess.Popen(
        [sys.executable, "-c", "import sys; from shardfix.api import convert; from shardfix.execute import Faults; "
         "from shardfix.options import ConvertOptions; "
         "convert(sys.argv[1], sys.argv[2], ConvertOptions(executor='inline', max_shard_size='1KiB', progress=False), "
         "faults=Faults(delay=0.3))", str(src), str(out)], env=_env())
    deadline = time.time() + 120
    while len(list((out / ".shardfix-staging").glob("*.done.json"))) < 3:
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    torch.save(_state(2000, 12), src)  # step-2000 weights, same names and shapes, same path
    r = subprocess.run([*cmd, "--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["executor"]["resumed_files"] == 0
    want = _state(2000, 12)
    got = {k: v for f in out.glob("model*.safetensors") for k, v in load_file(f).items()}
    assert set(got) == set(want) and all(bits_equal(got[k], want[k]) for k in want)


def _invariant(out: Path) -> str:
    """'complete' or 'not complete'; fails if OUT looks complete without being it."""
    names = {p.name for p in out.iterdir()} if out.exists() else set()
    data = [n for n in names if n.endswith(".safetensors")]
    if not data:
        return "not complete"
    assert REPORT_NAME in names, f"loadable files without a report: {sorted(names)}"
    status = json.loads((out / REPORT_NAME).read_text())["status"]
    if status == "complete":
        assert verify_output(out)[0] == []
        return "complete"
    return "not complete"


@pytest.mark.slow
def test_disk_full_while_finishing_never_looks_complete(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    size = 4 << 20
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root; the file-size-limit case is test_faults.py::test_disk_full_then_resume")
    try:
        src = _ckpt(tmp_path / "src", n=40)
        out = mnt / "out"
        cmd = ["convert", src, out, *INLINE, "--max-shard-size", "8KiB"]  # in this process: the tmpfs is real
        assert cli(capsys, *cmd)[0] == 0
        st = os.statvfs(mnt)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        page = 4096
        # while finishing, staging also holds a .done.json per data file and the final report beside the marker
        peak = -(-(out / REPORT_NAME).stat().st_size // page) + len(list(out.glob("*.safetensors"))) + 4
        shutil.rmtree(out)
        seen = set()
        # free pages from too few for the staged files to enough for everything finishing needs
        for extra in sorted({-2, 0, *range(1, peak, max(1, peak // 7)), peak, peak + 4}):
            filler = mnt / "filler"
            st = os.statvfs(mnt)
            free = st.f_bavail * st.f_frsize
            with filler.open("wb") as f:
                f.write(b"\0" * max(0, free - max(page, used + extra * page)))
            code, err = cli(capsys, *cmd)
            assert code in (0, 2), err
            state = _invariant(out)
            assert (code == 0) == (state == "complete"), (extra, code, err)
            seen.add(state)
            shutil.rmtree(out, ignore_errors=True)
            filler.unlink()
        assert seen == {"complete", "not complete"}
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_strict_turns_warnings_into_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "src"
    d.mkdir()
    torch.save({"model": _state(0), "optimizer": {"state": {0: {"exp_avg": torch.zeros(3, 3)}},
                                                  "param_groups": [{"lr": 0.1, "params": [0]}]}}, d / "ckpt.pt")
    code, err = cli(capsys, "plan", d / "ckpt.pt")
    assert code == 0
    out = tmp_path / "out"
    capsys.readouterr()
    code = cli_main([str(a) for a in ("convert", d / "ckpt.pt", out, *INLINE)])
    assert "warning(s)" in capsys.readouterr().out
    warnings = json.loads((out / REPORT_NAME).read_text())["warnings"]
    assert code == 0 and warnings  # the 3x3 moment fits no parameter: the optimizer is not written, loudly
    code, err = cli(capsys, "convert", d / "ckpt.pt", tmp_path / "strict", *INLINE, "--strict")
    assert code == 3 and "--strict" in err, err
    report = json.loads((tmp_path / "strict" / REPORT_NAME).read_text())
    assert report["status"] == "failed" and "--strict" in report["error"]
    assert not list((tmp_path / "strict").glob("*.safetensors"))
