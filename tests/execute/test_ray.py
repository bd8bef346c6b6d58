"""The Ray executor: byte-identical output inline, on a local instance and on a 3-node cluster;
a worker killed mid-conversion; an interrupted driver finished with ``--resume``; ``--device
cuda`` without a GPU; the pieces (grouping, progress, digests) on their own."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from shardfix.api import convert
from shardfix.execute import STAGING, Faults, Progress, TaskContext, write_file_task
from shardfix.options import ConvertOptions
from shardfix.report import REPORT_NAME
from tests._outputs import assert_same_output, output_bytes
from tests.conftest import FAULTS_HOOK, ROOT, run_cli

OPTS = {"vocab_size": 1000, "max_shard_size": "64KB"}  # ~16 output files from the FSDP fixture
CLI_OPTS = ["--vocab-size", "1000", "--max-shard-size", "64KB", "--no-progress"]


@pytest.fixture(scope="module")
def inline_ref(fsdp_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("ref") / "out"
    convert(fsdp_ckpt, out, ConvertOptions(executor="inline", progress=False, **OPTS))
    ref = output_bytes(out)
    assert len([n for n in ref if n.endswith(".safetensors")]) >= 10
    return ref


# -- executors agree ----------------------------------------------------------------------------


@pytest.mark.slow
def test_local_ray_instance_matches_inline(fsdp_ckpt, ray_session, inline_ref, tmp_path):
    out = tmp_path / "out"
    report = convert(fsdp_ckpt, out, ConvertOptions(executor="ray", workers=2, progress=False, **OPTS))
    assert_same_output(out, inline_ref)
    ex = report["executor"]
    assert ex["kind"] == "ray" and ex["tasks"] > 2 and ex["in_flight"] == 2
    assert all(f["verified"] == "xxh3" and f["pid"] != os.getpid() for f in report["outputs"]["files"])
    assert not (out / STAGING).exists()


@pytest.mark.slow
def test_cli_starts_its_own_quiet_local_instance(fsdp_ckpt, inline_ref, tmp_path):
    """No address: the CLI starts a local instance quietly, and removes its temp dir afterwards."""
    out = tmp_path / "out"
    r = run_cli("convert", fsdp_ckpt, out, *CLI_OPTS, "--executor", "ray", "--workers", "2",
                env={"RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"})
    assert r.code == 0, r.err
    assert_same_output(out, inline_ref)
    local = json.loads((out / REPORT_NAME).read_text())["executor"]["local_instance"]
    assert local["temp_dir"].startswith("/tmp/sfxray-") and not Path(local["temp_dir"]).exists()
    for noise in ("Started a local Ray instance", "View the dashboard", "Token authentication is"):
        assert noise not in r.err, r.err


@pytest.mark.slow
def test_three_node_cluster_matches_inline(fsdp_ckpt, inline_ref, tmp_path):
    """A simulated 3-node cluster (``ray.cluster_utils.Cluster``) in a subprocess of its own.

    A process can join only one Ray instance at a time and the session's shared instance
    (``ray_session``) may already be up in this process, so the cluster runs in a child
    process; it is started and shut down there, whatever order the tests run in.
    """
    out = tmp_path / "out"
    p = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "execute" / "_cluster_run.py"), str(fsdp_ckpt), str(out)],
        capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / FAULTS_HOOK}", "RAY_ADDRESS": "",
             "SHARDFIX_TEST_TASK_DELAY": "0.2"},
    )
    assert p.returncode == 0, p.stderr[-4000:]
    info = json.loads(p.stdout.strip().splitlines()[-1])
    assert info["alive_nodes"] == 3 and info["executor"]["nodes"] == 3
    assert len(info["node_ids"]) >= 2, "the tasks all ran on one node"
    assert_same_output(out, inline_ref)


# -- failures -----------------------------------------------------------------------------------


def _is_ray_worker(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return "ray::" in cmd or "default_worker.py" in cmd


@pytest.mark.slow
def test_worker_killed_mid_conversion(fsdp_ckpt, ray_session, inline_ref, tmp_path, monkeypatch):
    """SIGKILL the worker process running a task: Ray reruns it and the output is identical."""
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    faults = Faults(pid_dir=str(pid_dir), delay=0.5)  # each file pauses after its first tensor
    killed: dict[str, int] = {}
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set() and not killed:
            for f in sorted(pid_dir.glob("*.pid")):
                pid = int(f.read_text())
                if pid != os.getpid() and _is_ray_worker(pid):
                    os.kill(pid, signal.SIGKILL)
                    killed[f.name.removesuffix(".pid")] = pid
                    return
            time.sleep(0.02)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    out = tmp_path / "out"
    try:
        report = convert(fsdp_ckpt, out, ConvertOptions(executor="ray", workers=2, progress=False, **OPTS),
                         faults=faults)
    finally:
        stop.set()
        t.join(5)
    assert killed, "no task's worker was killed"
    assert_same_output(out, inline_ref)
    [(name, pid)] = killed.items()
    assert int((pid_dir / f"{name}.pid").read_text()) != pid, f"{name} was not rewritten by a new worker"
    by_name = {f["name"]: f for f in report["outputs"]["files"]}
    assert by_name[name]["pid"] != pid


@pytest.mark.slow
def test_io_errors_are_retried(fsdp_ckpt, ray_session, inline_ref, tmp_path, monkeypatch):
    """Every file's first attempt fails with EIO: Ray reruns the tasks and the output is identical."""
    fail_dir = tmp_path / "fail"
    fail_dir.mkdir()
    out = tmp_path / "out"
    report = convert(fsdp_ckpt, out, ConvertOptions(executor="ray", workers=2, progress=False, **OPTS),
                     faults=Faults(fail_once_dir=str(fail_dir)))
    assert_same_output(out, inline_ref)
    groups = report["executor"]["tasks"]
    assert len(list(fail_dir.glob("*.failed"))) >= groups  # each task failed at least once


def test_io_error_inline_is_a_clear_error(fsdp_ckpt, tmp_path):
    fail_dir = tmp_path / "fail"
    fail_dir.mkdir()
    r = run_cli("convert", fsdp_ckpt, tmp_path / "out", *CLI_OPTS, "--executor", "inline",
                env={"SHARDFIX_TEST_FAIL_ONCE_DIR": str(fail_dir)})
    assert r.code == 1 and "injected I/O error" in r.err
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert report["status"] == "failed" and "injected I/O error" in report["error"]


def _wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.slow
def test_interrupted_driver_then_resume(fsdp_ckpt, inline_ref, tmp_path):
    """SIGKILL the driver after a few files are staged: the directory never looks complete, and
    ``--resume`` finishes it byte-identical to an uninterrupted run, reusing the staged files."""
    out = tmp_path / "out"
    staging = out / STAGING
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / FAULTS_HOOK}", "SHARDFIX_TEST_TASK_DELAY": "0.4",
           "RAY_ADDRESS": ""}
    p = subprocess.Popen([sys.executable, "-m", "shardfix", "convert", str(fsdp_ckpt), str(out), *CLI_OPTS,
                          "--executor", "inline"], env=env, start_new_session=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: len(list(staging.glob("*.done.json"))) >= 3 or p.poll() is not None, 120, "3 staged files")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # the group we started: the driver and anything it spawned
        p.wait(30)
    assert p.returncode == -signal.SIGKILL, "the conversion finished before it could be interrupted"
    staged = len(list(staging.glob("*.done.json")))
    assert 3 <= staged < sum(n.endswith(".safetensors") for n in inline_ref)
    left = sorted(q.name for q in out.iterdir())
    assert left == sorted({STAGING, ".shardfix-lock", ".shardfix-manifest.json"} & {*left, STAGING}), left
    assert not list(out.glob("*.safetensors")) and not (out / REPORT_NAME).exists(), \
        "an interrupted directory must not look complete"

    r = run_cli("convert", fsdp_ckpt, out, *CLI_OPTS, "--executor", "inline")
    assert r.code == 2 and "--resume" in r.err

    r = run_cli("convert", fsdp_ckpt, out, *CLI_OPTS, "--executor", "inline", "--resume")
    assert r.code == 0, r.err
    assert_same_output(out, inline_ref)
    ex = json.loads((out / REPORT_NAME).read_text())["executor"]
    assert ex["resumed_files"] >= staged and ex["resumed_files"] + ex["written_files"] == len(
        [n for n in inline_ref if n.endswith(".safetensors")])


@pytest.mark.slow
def test_device_cuda_without_gpu_exits_2(fsdp_ckpt, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("tests the error a machine without a GPU gives; this machine has a GPU, so that error cannot occur")
    out = tmp_path / "out"
    for executor in ("inline", "ray"):
        r = run_cli("convert", fsdp_ckpt, out, "--vocab-size", "1000", "--device", "cuda", "--executor", executor,
                    env={"RAY_ADDRESS": ""})
        assert r.code == 2, (executor, r.err)
        assert "--device cuda: no CUDA GPU is visible" in r.err and "--device cpu" in r.err
        assert "Traceback" not in r.err
        assert not out.exists(), "a usage error must not create the output directory"


# -- pieces -------------------------------------------------------------------------------------


def test_group_files_budget():
    from shardfix.execute.ray import group_files, task_memory
    from shardfix.plan import OutputFile, OutputTensor

    def f(i: int, n: int) -> OutputFile:
        return OutputFile(f"f{i}", "model", [OutputTensor(f"t{i}", f"t{i}", "U8", [n])])

    small = [f(i, 10) for i in range(16)]
    assert [len(g) for g in group_files(small, slots=1)] == [4, 4, 4, 4]  # ~4 tasks per slot
    assert len(group_files(small, slots=8)) == 16  # enough slots: one file per task
    assert [len(g) for g in group_files([f(0, 10), f(1, 1000), f(2, 10)], 1, budget=100)] == [1, 1, 1]
    groups = group_files(small, slots=1, budget=35)
    assert [x.name for g in groups for x in g] == [x.name for x in small]  # order kept, nothing lost
    assert task_memory([f(0, 10), f(1, 1000)]) == (256 << 20) + 3000


def test_progress_bar_and_log_lines(caplog):
    stream = io.StringIO()
    p = Progress(2000, True, stream=stream)
    p.advance(1000, "model-00001.safetensors")
    p.close()
    text = stream.getvalue()
    assert text.startswith("\r[") and "50.0%" in text and "model-00001" in text and text.endswith("\n")

    quiet = io.StringIO()
    with caplog.at_level(logging.INFO, logger="shardfix.execute"):
        p = Progress(1000, None, already=1000, interval=0, stream=quiet)
        p.advance(500, "a")
        p.advance(500, "b")
        p.close()
    assert quiet.getvalue() == ""  # not a terminal: log lines instead of a bar
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress")]
    assert len(lines) == 2 and lines[0].startswith("progress 75.0%") and lines[1].startswith("progress 100.0%")

    off = io.StringIO()
    p = Progress(10, False, stream=off)
    p.advance(10, "x")
    p.close()
    assert off.getvalue() == ""


def test_retryable_io_error_keeps_exit_code_and_cause_detection():
    import pickle

    from shardfix.errors import IncompleteSourceError
    from shardfix.execute.ray import RetryableIOError, _io_cause

    e = pickle.loads(pickle.dumps(RetryableIOError("disk hiccup", 1)))
    assert str(e) == "disk hiccup" and e.exit_code == 1
    try:
        try:
            raise OSError(5, "Input/output error")
        except OSError as os_err:
            raise IncompleteSourceError("read error") from os_err
    except IncompleteSourceError as err:
        assert isinstance(_io_cause(err), OSError)
    assert _io_cause(IncompleteSourceError("missing chunk")) is None
    assert _io_cause(FileNotFoundError(2, "gone")) is None  # a missing file is not retried


def test_tensor_digest_is_byte_exact():
    from shardfix.io.digest import tensor_digest

    a = torch.arange(1000, dtype=torch.float32).reshape(10, 100)
    assert tensor_digest(a) == tensor_digest(a.clone())
    assert tensor_digest(a) == tensor_digest(a.t().contiguous().t())  # layout does not matter, values do
    b = a.clone()
    b.view(-1)[517] = torch.nextafter(b.view(-1)[517], torch.tensor(1e9))
    assert tensor_digest(a) != tensor_digest(b)
    assert tensor_digest(a) != tensor_digest(a.view(torch.int32))  # dtype is part of it
    assert tensor_digest(a) != tensor_digest(a.reshape(100, 10))  # so is shape
    assert tensor_digest(torch.tensor(0.0)) != tensor_digest(torch.tensor(-0.0))
    assert tensor_digest(torch.zeros(0)) == tensor_digest(torch.zeros(0))
    odd = torch.arange(7, dtype=torch.uint8)  # not a multiple of 8 bytes
    assert tensor_digest(odd) != tensor_digest(torch.arange(8, dtype=torch.uint8)[:7].clone().add_(1))


def test_digest_verification_path(fsdp_ckpt, tmp_path):
    """The GPU path's verify (re-read, per-tensor digests) runs on the CPU too and writes the same bytes."""
    from dataclasses import asdict, replace

    from shardfix.api import plan_conversion

    plan = plan_conversion(fsdp_ckpt, ConvertOptions(**OPTS))
    of = plan.files[0]
    results = {}
    for mode in ("xxh3", "digest"):
        staging = tmp_path / mode
        staging.mkdir()
        ctx = TaskContext(source=plan.source["path"], format=plan.source["format"], staging=str(staging),
                          device="cpu", verify=True, verify_mode=mode)
        results[mode] = write_file_task(ctx, asdict(of))
        assert results[mode]["verified"] == mode
    assert (tmp_path / "xxh3" / of.name).read_bytes() == (tmp_path / "digest" / of.name).read_bytes()
    assert results["xxh3"]["checksum"] == results["digest"]["checksum"]
    # a rerun of a task (worker died after staging) reuses the staged file instead of rewriting it
    again = write_file_task(replace(ctx, staging=str(tmp_path / "digest")), asdict(of))
    assert again.get("reused") is True and again["checksum"] == results["digest"]["checksum"]
