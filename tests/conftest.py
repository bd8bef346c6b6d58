"""Shared fixtures: one real FSDP2 checkpoint and one local Ray instance per test session."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

FAULTS_HOOK = "tests/faults_hook"  # sitecustomize that turns SHARDFIX_TEST_* into Faults
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(*args: str | os.PathLike[str], timeout: float = 300, env: dict[str, str] | None = None) -> CliResult:
    """Run ``python -m shardfix ARGS`` in a subprocess, as a user would."""
    full_env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / FAULTS_HOOK}", **(env or {})}
    p = subprocess.run(
        [sys.executable, "-m", "shardfix", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=full_env, stdin=subprocess.DEVNULL,
    )
    return CliResult(p.returncode, p.stdout, p.stderr)


def cli_in_process(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    """Run the CLI in this process (same exit-code mapping as ``python -m shardfix``): (exit code, stderr).

    Bad input must never end in a traceback, whatever the exit code.
    """
    from shardfix.cli import main as cli_main

    capsys.readouterr()
    code = cli_main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture(scope="session")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-rank FSDP2 run on gloo: ``checkpoint/`` (DCP) and ``reference.pt`` (full tensors).

    Vocab 1000 padded to 1024, ``scalars`` 5 + 1 padding, uneven rows (131 -> 66 + 65), a 0-size
    chunk (``gate`` [1, d]), bf16 and fp32 parameters, a buffer, AdamW state.
    """
    from shardfix.examples.fsdp_train import make_checkpoint

    out = tmp_path_factory.mktemp("fsdp")
    make_checkpoint(out, world_size=2, vocab=1000, steps=2)
    return out


@pytest.fixture(scope="session")
def fsdp_ckpt(fsdp_run: Path) -> Path:
    return fsdp_run / "checkpoint"


@pytest.fixture()
def reference(fsdp_run: Path) -> dict:
    """What the training process held: full model state dict and full optimizer state dict.

    Loaded afresh for each test: a test that loads it into an optimizer and steps would
    otherwise change the shared tensors (``step`` is updated in place).
    """
    return torch.load(fsdp_run / "reference.pt", weights_only=True)


@pytest.fixture(scope="session")
def ray_session():
    """One quiet, loopback-only local Ray instance shared by the session's Ray tests."""
    import ray

    from shardfix.execute.ray import local_ray_env

    os.environ.update(local_ray_env())
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    tmp = tempfile.mkdtemp(prefix="sfxt-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, _node_ip_address="127.0.0.1",
             logging_level="WARNING", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality of dtype, shape and every byte (NaN-safe, -0.0 distinct from 0.0)."""
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    if a.numel() == 0:
        return True
    # clone, not .contiguous(): a 1-element view counts as contiguous yet may keep a stride != 1
    a, b = (x.clone(memory_format=torch.contiguous_format).reshape(-1) for x in (a, b))
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def flip(path: Path, at: int, mask: int = 0x01) -> None:
    """XOR one byte of a file in place (a second call with the same mask restores it)."""
    with path.open("r+b") as f:
        f.seek(at)
        b = f.read(1)[0]
        f.seek(at)
        f.write(bytes([b ^ mask]))
