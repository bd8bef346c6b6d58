"""Converting from inside a directory that holds modules named like shardfix's dependencies never
runs them: not in the driver (``python -m shardfix`` drops the working directory from ``sys.path``)
and not in Ray workers (``ray.init`` runs from an empty directory, so the working directory is never
on a worker's import path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

SHADOW = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\nraise ImportError('shadow module ran')\n"


@pytest.mark.slow
def test_modules_in_the_working_directory_never_run(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="the Ray executor needs ray (pip install -e '.[ray]')")
    here = tmp_path / "ckpt"
    here.mkdir()
    g = torch.Generator().manual_seed(0)
    torch.save({f"l{i}.weight": torch.randn(8, 4, generator=g) for i in range(4)}, here / "model.pt")
    markers = {name: tmp_path / f"{name}.ran" for name in ("zstandard", "xxhash", "safetensors")}
    for name, marker in markers.items():
        (here / f"{name}.py").write_text(SHADOW.format(marker=str(marker)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "PYTHONDONTWRITEBYTECODE": "1"}
    p = subprocess.run([sys.executable, "-m", "shardfix", "convert", "model.pt", str(tmp_path / "out"),
                        "--executor", "ray", "--workers", "1", "--max-shard-size", "64B", "--no-progress"],
                       cwd=here, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "executor: ray" in p.stdout or "ray" in p.stdout
    assert not [n for n, m in markers.items() if m.exists()], p.stderr
