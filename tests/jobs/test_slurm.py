"""``scripts/slurm/shardfix.sbatch``: syntax, the commands it renders for a 3-node allocation, and
one real run on this machine with stand-ins for ``srun`` and ``scontrol``."""

from __future__ import annotations

import os
import shlex
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
from shardfix.options import ConvertOptions
from tests._outputs import assert_same_output, output_bytes
from tests.conftest import ROOT

SBATCH = ROOT / "scripts" / "slurm" / "shardfix.sbatch"

FAKE_SCONTROL = """#!/bin/sh
# stand-in for scontrol: `show hostnames` prints $FAKE_NODES, one a line
[ "$1 $2" = "show hostnames" ] && { for n in $FAKE_NODES; do echo "$n"; done; exit 0; }
exit 1
"""
FAKE_SRUN = """#!/usr/bin/env bash
# stand-in for srun on one machine: drop srun's own --options, run the command here
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done
exec "$@"
"""


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (d / name).write_text(text)
        (d / name).chmod(0o755)
    return d


def render(fake_bin: Path, nodes: str, **env: str) -> tuple[int, list[list[str]], str]:
    """Run the script with SHARDFIX_DRY_RUN=1; return its exit code, the commands (split) and stderr."""
    full = {"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "HOME": os.environ.get("HOME", "/root"),
            "FAKE_NODES": nodes, "SLURM_JOB_NODELIST": "node[01-03]", "SLURM_JOB_ID": "42",
            "SHARDFIX_DRY_RUN": "1", **env}
    p = subprocess.run(["bash", str(SBATCH), "jobs/fsdp2-to-hf.toml"], capture_output=True, text=True, env=full,
                       cwd=ROOT, timeout=60, stdin=subprocess.DEVNULL)
    cmds = [shlex.split(line[2:]) for line in p.stdout.splitlines() if line.startswith("+ ")]
    return p.returncode, cmds, p.stderr


def test_sbatch_script_syntax():
    assert SBATCH.read_text().startswith("#!/usr/bin/env bash")
    p = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    text = SBATCH.read_text()
    for directive in ("#SBATCH --nodes=", "#SBATCH --cpus-per-task=", "#SBATCH --ntasks-per-node=1"):
        assert directive in text


def test_rendered_commands_head_and_workers(fake_bin):
    code, cmds, err = render(
        fake_bin, "node01 node02 node03", SLURM_CPUS_PER_TASK="8", SLURM_GPUS_PER_NODE="a100:4",
        SHARDFIX_HEAD_IP="10.0.0.1", SHARDFIX_PYTHON="/shared/env/bin/python", RAY_PORT="6380",
        RAY_MIN_WORKER_PORT="20000", RAY_MAX_WORKER_PORT="20999", SHARDFIX_RAY_TMPDIR="/scratch/r42",
        SHARDFIX_RAY_START_ARGS="--object-store-memory=1000000000 --dashboard-agent-listen-port=52366")
    assert code == 0, err
    assert len(cmds) == 4, cmds
    head, workers, wait, conv = cmds
    common = ["--num-cpus=8", "--num-gpus=4", "--temp-dir=/scratch/r42", "--min-worker-port=20000",
              "--max-worker-port=20999", "--object-store-memory=1000000000", "--dashboard-agent-listen-port=52366"]
    assert head[:4] == ["srun", "--nodes=1", "--ntasks=1", "--nodelist=node01"]
    assert "--cpus-per-task=8" in head and "--gpus-per-task=4" in head
    i = head.index("start")
    assert head[i - 1] == "ray" and head[i:i + 5] == ["start", "--head", "--block", "--node-ip-address=10.0.0.1",
                                                     "--port=6380"]
    assert all(o in head for o in common) and "--include-dashboard=false" in head
    assert workers[:4] == ["srun", "--nodes=2", "--ntasks=2", "--exclude=node01"]
    j = workers.index("start")
    assert workers[j:j + 3] == ["start", "--block", "--address=10.0.0.1:6380"] and all(o in workers for o in common)
    assert wait[:2] == ["/shared/env/bin/python", "-"] and wait[2:] == ["10.0.0.1:6380", "3", "120"]
    assert conv == ["env", "RAY_ADDRESS=10.0.0.1:6380", "/shared/env/bin/python", "-m", "shardfix", "convert",
                    "--job", "jobs/fsdp2-to-hf.toml"]
    assert "3 node(s) [node01 node02 node03]" in err and "auth token" in err


def test_rendered_commands_symmetric_run(fake_bin):
    code, cmds, err = render(fake_bin, "node01 node02 node03", SHARDFIX_RAY_MODE="symmetric",
                             SLURM_CPUS_ON_NODE="16", SHARDFIX_HEAD_IP="10.0.0.1", RAY_AUTH_MODE="disabled",
                             RAY_DASHBOARD_PORT="8265")
    assert code == 0, err
    [cmd] = cmds
    assert cmd[:5] == ["srun", "--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--cpus-per-task=16"]
    k = cmd.index("symmetric-run")
    assert cmd[k + 1:k + 3] == ["--address=10.0.0.1:6379", "--min-nodes=3"]
    assert "--num-cpus=16" in cmd and "--num-gpus=0" in cmd and "--temp-dir=/tmp/ray-42" in cmd
    assert "--dashboard-port=8265" in cmd and "--include-dashboard=true" in cmd
    sep = cmd.index("--")
    assert cmd[sep + 1:] == ["env", "RAY_ADDRESS=10.0.0.1:6379", "python3", "-m", "shardfix", "convert", "--job",
                             "jobs/fsdp2-to-hf.toml"]
    assert "auth disabled" in err


def test_script_refuses_bad_setups(fake_bin):
    code, _, err = render(fake_bin, "node01", SHARDFIX_RAY_MODE="mpi")
    assert code == 2 and "SHARDFIX_RAY_MODE=mpi" in err
    env = {"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "FAKE_NODES": "node01"}
    p = subprocess.run(["bash", str(SBATCH), "job.toml"], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode != 0 and "inside a SLURM allocation" in p.stderr
    p = subprocess.run(["bash", str(SBATCH), "/no/such/job.toml"], capture_output=True, text=True, timeout=60,
                       env={**env, "SLURM_JOB_NODELIST": "node01"})
    assert p.returncode == 2 and "no such job file" in p.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _procs_naming(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if stat[stat.rindex(")") + 2] != "Z" and text in cmdline:
                pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_script_runs_a_job_on_one_node(fake_bin, fsdp_ckpt, tmp_path):
    """The real thing on one node: `ray start --head --block` as a step, token auth, the job, teardown."""
    ref = tmp_path / "ref"
    convert(fsdp_ckpt, ref, ConvertOptions(vocab_size=1000, max_shard_size="64KB", executor="inline", progress=False))
    ray_tmp = tempfile.mkdtemp(prefix="sfxs-", dir="/tmp")  # short: Ray's socket paths are limited
    job = tmp_path / "job.toml"
    job.write_text(f'source = "{fsdp_ckpt}"\noutput = "{tmp_path / "out"}"\nvocab_size = 1000\n'
                   'max_shard_size = "64KB"\n')
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "FAKE_NODES": "node01", "SLURM_JOB_NODELIST": "node01", "SLURM_JOB_ID": "7",
           "SLURM_CPUS_PER_TASK": "2", "SHARDFIX_HEAD_IP": "127.0.0.1", "SHARDFIX_PYTHON": sys.executable,
           "RAY_PORT": str(_free_port()), "RAY_CLIENT_SERVER_PORT": str(_free_port()),
           "DASHBOARD_METRIC_PORT": str(_free_port()), "AUTOSCALER_METRIC_PORT": str(_free_port()),
           "SHARDFIX_RAY_START_ARGS": " ".join(f"--{flag}={_free_port()}" for flag in (  # Ray's fixed defaults
               "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
               "runtime-env-agent-port")),
           "SHARDFIX_RAY_TMPDIR": f"{ray_tmp}/ray", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep 127.0.0.1
           "RAY_ADDRESS": "", "SHARDFIX_NODE_WAIT": "90"}
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)  # the script's default: a fresh token for the allocation
    p = subprocess.Popen(["bash", str(SBATCH), str(job)], env=env, start_new_session=True, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        out, _ = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        time.sleep(1)
        left = _procs_naming(ray_tmp)
        for pid in left:  # only processes that name this test's own Ray temp dir
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert p.returncode == 0, out[-4000:]
    assert "auth token" in out and "shardfix exited with 0" in out
    assert_same_output(tmp_path / "out", output_bytes(ref))
    assert not left, f"Ray processes left running after the script: {left}"
