"""Job files (``convert --job``) and Ray's job server (``submit``, ``status``, ``logs``, ``stop``)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from shardfix.api import convert
from shardfix.errors import BadInputError
from shardfix.jobs import exit_code_of, job_server_address, job_toml, load_job
from shardfix.options import ConvertOptions
from tests._outputs import assert_same_output, output_bytes
from tests.conftest import FAULTS_HOOK, ROOT, run_cli

EXAMPLES = sorted((ROOT / "jobs").glob("*.toml"))


def write_job(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- job files ----------------------------------------------------------------------------------


def test_examples_are_valid_jobs():
    assert {p.name for p in EXAMPLES} >= {"fsdp2-to-hf.toml", "modded-nanogpt-finetune.toml"}
    for path in EXAMPLES:
        job = load_job(path)
        assert job.name == path.stem and Path(job.source).is_absolute() and Path(job.output).is_absolute()
        assert job.options.vocab_size and job.options.resume
        again = load_job(write_job(Path(tempfile.mkdtemp()) / "j.toml", job_toml(job)))
        assert again.options == job.options and (again.source, again.output) == (job.source, job.output)
    nano = load_job(ROOT / "jobs" / "modded-nanogpt-finetune.toml")
    assert nano.options.split_fused and nano.options.no_optimizer and nano.options.vocab_size == 50257


def test_job_keys_are_flag_names(tmp_path):
    job = load_job(write_job(tmp_path / "j.toml", """
source = "ckpt"
output = "/abs/out"
vocab_size = 1000
workers = 2
max_shard_size = "64KB"
no_optimizer = true
target_shapes = "shapes/t.json"
[submit]
entrypoint_num_cpus = 1
env_vars = { OMP_NUM_THREADS = "1" }
pip = ["zstandard"]
"""))
    assert job.source == str(tmp_path / "ckpt") and job.output == "/abs/out"  # relative to the job file
    assert job.options.target_shapes == str(tmp_path / "shapes" / "t.json")
    assert (job.options.vocab_size, job.options.workers, job.options.max_shard_size) == (1000, 2, 64000)
    assert job.options.no_optimizer and job.name == "j"
    assert job.submit.entrypoint_num_cpus == 1.0 and job.submit.env_vars == {"OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("body, needle", [
    ('vocab_sise = 1000', "unknown key 'vocab_sise'; did you mean 'vocab_size'?"),
    ('vocab-size = 1000', "unknown key 'vocab-size'; write vocab_size"),
    ('frobnicate = 1', "unknown key 'frobnicate'"),
    ('extra = 1', "unknown key 'extra'"),
    ('vocab_size = "1000"', "vocab_size must be an integer, got '1000'"),
    ('workers = true', "workers must be an integer"),
    ('split_fused = 1', "split_fused must be true/false"),
    ('workers = 0', "--workers: must be at least 1"),
    ('executor = "spark"', "--executor: 'spark' is not one of"),
    ('[submit]\nnum_cpus = 1', "unknown key 'num_cpus' in [submit]"),
    ('[submit]\nentrypoint_num_cpus = "one"', "[submit] entrypoint_num_cpus must be a number"),
    ('name = "has space"', "name must be 1-64 letters"),
])
def test_bad_job_files_name_the_key_and_file(tmp_path, body, needle):
    path = write_job(tmp_path / "bad.toml", f'source = "a"\noutput = "b"\n{body}\n')
    with pytest.raises(BadInputError) as e:
        load_job(path)
    assert needle in str(e.value) and str(path) in str(e.value)


def test_job_file_problems(tmp_path):
    with pytest.raises(BadInputError, match="missing output"):
        load_job(write_job(tmp_path / "a.toml", 'source = "x"\n'))
    with pytest.raises(BadInputError, match="not valid TOML"):
        load_job(write_job(tmp_path / "b.toml", 'source = \n'))
    with pytest.raises(BadInputError, match="no such file"):
        load_job(tmp_path / "missing.toml")
    r = run_cli("convert", "--job", write_job(tmp_path / "c.toml", 'source = "a"\noutput = "b"\nvocab = 3\n'))
    assert r.code == 2 and "unknown key 'vocab'" in r.err and "c.toml" in r.err


def test_convert_job_locally_matches_flags(fsdp_ckpt, tmp_path):
    ref = tmp_path / "ref"
    convert(fsdp_ckpt, ref, ConvertOptions(vocab_size=1000, max_shard_size="256KB", executor="inline", progress=False))
    job = write_job(tmp_path / "job.toml", f"""
name = "local"
source = "{fsdp_ckpt}"
output = "out"
vocab_size = 1000
max_shard_size = "256KB"
executor = "inline"
""")
    r = run_cli("convert", "--job", job, env={"RAY_ADDRESS": ""})
    assert r.code == 0, r.err
    assert_same_output(tmp_path / "out", output_bytes(ref))
    r = run_cli("convert", "--job", job, "somewhere")
    assert r.code == 2 and "takes no SRC or OUT" in r.err


def test_job_server_address_and_exit_codes(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(BadInputError, match="--address"):
        job_server_address(None)
    assert job_server_address("10.1.2.3:8265") == "http://10.1.2.3:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")  # a GCS address is not the job server
    with pytest.raises(BadInputError):
        job_server_address(None)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://ray.example:443/")
    assert job_server_address(None) == "https://ray.example:443"
    assert exit_code_of({"status": "SUCCEEDED"}) == 0
    assert exit_code_of({"status": "FAILED", "driver_exit_code": 2}) == 2
    assert exit_code_of({"status": "FAILED", "driver_exit_code": None}) == 1
    assert exit_code_of({"status": "STOPPED", "driver_exit_code": -15}) == 1


def test_submit_unreachable_server_is_a_clear_error(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    job = write_job(tmp_path / "j.toml", 'source = "/x"\noutput = "/y"\n')
    r = run_cli("submit", job, "--address", f"127.0.0.1:{port}", env={"RAY_AUTH_MODE": "disabled"}, timeout=120)
    assert r.code == 2 and "cannot reach Ray's job server" in r.err and "Traceback" not in r.err


# -- a real head on loopback --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """``ray start --head`` on loopback with its dashboard (the job server) and token auth.

    Started in a new session, so its daemons share one process group; ``stop()`` ends exactly
    the processes in that group plus any whose command line names this head's own temp dir
    (workers the raylet started), and nothing else -- never ``ray stop``.
    """

    def __init__(self) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="sfxj-", dir="/tmp")
        self.token = secrets.token_hex(16)
        self.port, self.dashboard_port = _free_port(), _free_port()
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep --node-ip-address=127.0.0.1 (Ray swaps it otherwise)
            "RAY_USAGE_STATS_ENABLED": "0",
            "DASHBOARD_METRIC_PORT": str(_free_port()), "AUTOSCALER_METRIC_PORT": str(_free_port()),
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),  # the job's `python` is this venv's
            "PYTHONPATH": "",  # shardfix must reach the job through its runtime env
            "RAY_ADDRESS": "",
        }
        cmd = [str(Path(bin_dir) / "ray"), "start", "--head", f"--port={self.port}",
               f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}",
               f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
               f"--dashboard-agent-grpc-port={_free_port()}", f"--metrics-export-port={_free_port()}",
               f"--runtime-env-agent-port={_free_port()}",  # Ray's fixed defaults clash with other instances
               "--num-cpus=1", "--disable-usage-stats"]
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=self.env, start_new_session=True, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.pgid = self.proc.pid
        out, _ = self.proc.communicate(timeout=180)
        self.start_seconds = time.monotonic() - t0
        if self.proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{out[-3000:]}")
        self.url = f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self, **extra: str) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_ADDRESS": "", **extra}

    def _ours(self) -> list[int]:
        """Live processes in the head's process group or naming its temp dir (read from /proc)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                stat = (entry / "stat").read_text()
                state, _ppid, pgid = stat[stat.rindex(")") + 2:].split()[:3]
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if state != "Z" and (int(pgid) == self.pgid or self.temp_dir in cmdline):
                pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self._ours():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while self._ours() and time.monotonic() < deadline:
                time.sleep(0.1)
        left = self._ours()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        assert not left, f"head processes still running: {left}"


@pytest.fixture(scope="module")
def ray_head():
    head = RayHead()
    try:
        yield head
    finally:
        head.stop()


@pytest.mark.slow
def test_submit_status_logs_on_a_real_head(ray_head, fsdp_ckpt, tmp_path):
    ref = tmp_path / "ref"
    convert(fsdp_ckpt, ref, ConvertOptions(vocab_size=1000, max_shard_size="64KB", executor="inline", progress=False))
    env = ray_head.client_env()
    good = write_job(tmp_path / "good.toml", f"""
name = "fixture-to-hf"
source = "{fsdp_ckpt}"
output = "{tmp_path / 'out'}"
vocab_size = 1000
max_shard_size = "64KB"
""")
    r = run_cli("submit", good, "--address", ray_head.url, "--wait", "--submission-id", "good-1", env=env, timeout=240)
    assert r.code == 0, r.out + r.err
    assert "submitted good-1" in r.out and "good-1: SUCCEEDED" in r.out and "status: complete" in r.out
    assert "INFO" not in r.err, r.err  # Ray's own log lines stay quiet
    assert_same_output(tmp_path / "out", output_bytes(ref))
    report = json.loads((tmp_path / "out" / "shardfix-report.json").read_text())
    assert report["executor"]["kind"] == "ray"  # RAY_ADDRESS in the job: its tasks ran on the cluster

    r = run_cli("status", "good-1", "--address", ray_head.url, env=env)
    assert r.code == 0 and r.out.startswith("good-1: SUCCEEDED (exit 0)"), r.out + r.err
    r = run_cli("status", "good-1", "--address", ray_head.url, "--json", env=env)
    info = json.loads(r.out)
    assert info["status"] == "SUCCEEDED" and info["metadata"]["shardfix_job"] == "fixture-to-hf"
    r = run_cli("logs", "good-1", "--address", ray_head.url, env=env)
    assert r.code == 0 and "status: complete" in r.out and f"wrote {tmp_path / 'out'}" in r.out

    bad = write_job(tmp_path / "bad.toml", f"""
source = "{tmp_path / 'no-such-checkpoint'}"
output = "{tmp_path / 'out-bad'}"
""")
    r = run_cli("submit", bad, "--address", ray_head.url, "--wait", "--submission-id", "bad-1", env=env, timeout=240)
    assert r.code == 2, r.out + r.err  # the job's own exit code
    assert "bad-1: FAILED (exit 2)" in r.out
    r = run_cli("logs", "bad-1", "--address", ray_head.url, env=env)
    assert f"shardfix: error: {tmp_path / 'no-such-checkpoint'}: no such file or directory" in r.out
    assert "Traceback" not in r.out
    r = run_cli("status", "bad-1", "--address", ray_head.url, env=env)
    assert r.out.startswith("bad-1: FAILED (exit 2)")

    r = run_cli("status", "no-such-job", "--address", ray_head.url, env=env)
    assert r.code == 2 and "no job 'no-such-job'" in r.err
    r = run_cli("status", "good-1", "--address", ray_head.url, env=ray_head.client_env(RAY_AUTH_TOKEN="wrong"))
    assert r.code == 2 and "rejected the token" in r.err
    r = run_cli("status", "good-1", "--address", ray_head.url, env=ray_head.client_env(RAY_AUTH_MODE="disabled"))
    assert r.code == 2 and "RAY_AUTH_MODE=token" in r.err


@pytest.mark.slow
def test_stop_a_running_job(ray_head, fsdp_ckpt, tmp_path):
    slow = write_job(tmp_path / "slow.toml", f"""
source = "{fsdp_ckpt}"
output = "{tmp_path / 'out'}"
vocab_size = 1000
max_shard_size = "64KB"
executor = "inline"
[submit]
env_vars = {{ SHARDFIX_TEST_TASK_DELAY = "2", PYTHONPATH = "{ROOT / FAULTS_HOOK}" }}
""")
    env = ray_head.client_env()
    r = run_cli("submit", slow, "--address", ray_head.url, "--submission-id", "slow-1", env=env)
    assert r.code == 0 and "shardfix logs slow-1" in r.out, r.err
    deadline = time.monotonic() + 120
    while "RUNNING" not in run_cli("status", "slow-1", "--address", ray_head.url, env=env).out:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.5)
    r = run_cli("stop", "slow-1", "--address", ray_head.url, env=env)
    assert r.code == 0 and "slow-1: stop requested" in r.out
    deadline = time.monotonic() + 60
    while not (r := run_cli("status", "slow-1", "--address", ray_head.url, env=env)).out.startswith("slow-1: STOPPED"):
        assert time.monotonic() < deadline, r.out + r.err
        time.sleep(0.5)
    assert not (tmp_path / "out" / "shardfix-report.json").exists() or json.loads(
        (tmp_path / "out" / "shardfix-report.json").read_text())["status"] != "complete"


@pytest.mark.slow
def test_convert_ray_address_with_a_wrong_or_missing_token_creates_no_out(ray_head, fsdp_ckpt, tmp_path):
    """``convert --ray-address`` against a token-auth cluster: a missing or wrong token is exit 2 saying
    which, and OUT is never created (the cluster is probed before the output directory is touched)."""
    address = f"127.0.0.1:{ray_head.port}"
    out = tmp_path / "out"
    quick = {"SHARDFIX_RAY_CONNECT_TIMEOUT": "30"}  # the production default waits 60 s for a first answer
    cases = {"missing": ray_head.client_env(RAY_AUTH_MODE="disabled", RAY_AUTH_TOKEN="", **quick),
             "wrong": ray_head.client_env(RAY_AUTH_TOKEN="0" * 32, **quick)}
    for what, env in cases.items():
        r = run_cli("convert", fsdp_ckpt, out, "--ray-address", address, "--executor", "ray", "--no-progress",
                    env=env, timeout=240)
        assert r.code == 2, (what, r.err)
        assert f"--ray-address {address}" in r.err and "token" in r.err.lower() and "Traceback" not in r.err, r.err
        assert not out.exists(), f"{what} token: OUT was created"
