"""Transposed, non-contiguous and every safetensors dtype round-trip exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from shardfix.api import convert
from shardfix.dtypes import ST_TO_TORCH
from shardfix.options import ConvertOptions
from shardfix.outputs.writer import TensorSpec, build_header
from tests.conftest import bits_equal


def all_dtype_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for st, dt in ST_TO_TORCH.items():
        raw = torch.randint(0, 256, (5, 6), dtype=torch.uint8, generator=g)
        if dt == torch.bool:
            t = raw % 2 == 1
        else:
            t = raw.view(torch.uint8).repeat(1, dt.itemsize).view(dt) if dt.itemsize > 1 else raw.view(dt)
        out[f"w_{st.lower()}"] = t
        out[f"w_{st.lower()}_t"] = t.t()  # transposed view: non-contiguous
    out["strided"] = torch.arange(60, dtype=torch.float32).reshape(6, 10)[:, ::2]
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.empty(0, 4)
    return out


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_every_dtype_and_layout_round_trips(fmt: str, tmp_path: Path) -> None:
    tensors = all_dtype_tensors()
    if fmt == "torch":
        src = tmp_path / "ckpt.pt"
        torch.save({"model": tensors}, src)
    else:
        src = tmp_path / "dcp"
        dcp.save({"model": tensors}, checkpoint_id=src, no_dist=True)
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(executor="inline", progress=False))
    got = load_file(out / "model.safetensors")
    assert set(got) == set(tensors)
    for name, want in tensors.items():
        assert bits_equal(got[name], want), name


def test_header_matches_safetensors_reference(tmp_path: Path) -> None:
    """Our header is what the safetensors library reads: same names, dtypes, shapes, offsets."""
    import json
    import struct

    specs = [TensorSpec("a", "BF16", (2, 3)), TensorSpec("b", "F8_E4M3", (4,)), TensorSpec("s", "F32", ())]
    header = build_header(specs, {"format": "pt"})
    (n,) = struct.unpack("<Q", header[:8])
    assert n % 8 == 0 and len(header) == 8 + n
    doc = json.loads(header[8:])
    assert doc["a"] == {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}
    assert doc["b"] == {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [12, 16]}
    assert doc["s"] == {"dtype": "F32", "shape": [], "data_offsets": [16, 20]}
    assert doc["__metadata__"] == {"format": "pt"}
