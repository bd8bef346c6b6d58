"""Builders of small crafted inputs that declare far more than they hold (bombs), with real file formats.

Every builder writes genuine bytes: DCP metadata is pickled torch ``Metadata`` objects, records
are real ``torch.save`` archives (optionally in a real zstd frame), ``.pt`` files are real zips.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from pathlib import Path

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)


def _record(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def write_dcp(path: Path, key: str, shape: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]],
              record: bytes, transforms: tuple[str, ...] = ()) -> Path:
    """A DCP directory whose tensor ``key`` has ``boxes``; every box's record is ``record`` (one copy on disk)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "__0_0.distcp").write_bytes(record)
    chunks = [ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s in boxes]
    props = TensorProperties(dtype=torch.float32)
    md = Metadata(state_dict_metadata={key: TensorStorageMetadata(props, torch.Size(shape), chunks)})
    md.storage_data = {
        MetadataIndex(key, torch.Size(o)): _StorageInfo("__0_0.distcp", 0, len(record), transforms) for o, _ in boxes
    }
    md.planner_data = {key: (key,)}
    (path / ".metadata").write_bytes(pickle.dumps(md))
    return path


def boxes_along(dim: int, n: int, other: int = 1) -> tuple[tuple[int, ...], list[tuple[tuple[int, ...], tuple[int, ...]]]]:
    """``n`` one-wide boxes along ``dim`` of a 2-D tensor (``other`` long in the other dim)."""
    shape = (n, other) if dim == 0 else (other, n)
    boxes = [((i, 0), (1, other)) if dim == 0 else ((0, i), (other, 1)) for i in range(n)]
    return shape, boxes


def plain_dcp_boxes(path: Path, dim: int, n: int) -> Path:
    """A DCP of ``n`` boxes along ``dim``, each pointing at one real 1-element record (plan reads none)."""
    shape, boxes = boxes_along(dim, n)
    return write_dcp(path, "w", shape, boxes, _record(torch.zeros(1)))


def zstd_bomb_dcp(path: Path, expanded: int = 2 << 30) -> Path:
    """A DCP whose one record is a zstd frame expanding to ``expanded`` zero bytes; its box is 1 KiB."""
    import zstandard

    cctx = zstandard.ZstdCompressor(level=1)
    out = io.BytesIO()
    with cctx.stream_writer(out, closefd=False) as w:
        block = bytes(1 << 24)
        for _ in range(expanded // len(block)):
            w.write(block)
    return write_dcp(path, "w", (256,), [((0,), (256,))], out.getvalue(), ("stream.zstd",))


def stride0_dcp(path: Path, rows: int = 1 << 18, cols: int = 1024) -> Path:
    """A DCP whose record is an expanded (stride-0) view of one row: ~2 KB for a ``rows x cols`` fp32 box."""
    t = torch.zeros(1, cols).expand(rows, cols)
    return write_dcp(path, "w", (rows, cols), [((0, 0), (rows, cols))], _record(t))


def memo_chunk_metadata(path: Path, tensors: int = 200, per_tensor: int = 10_000) -> Path:
    """A ``.metadata`` where every tensor references the same memoised list of ``per_tensor`` chunks."""
    path.mkdir(parents=True, exist_ok=True)
    rec = _record(torch.zeros(1))
    (path / "__0_0.distcp").write_bytes(rec)
    props = TensorProperties(dtype=torch.float32)
    shared = [ChunkStorageMetadata(offsets=torch.Size([0]), sizes=torch.Size([1]))] * per_tensor
    md = Metadata(state_dict_metadata={f"w{i}": TensorStorageMetadata(props, torch.Size([1]), shared)
                                       for i in range(tensors)})
    md.storage_data = {MetadataIndex(f"w{i}", torch.Size([0])): _StorageInfo("__0_0.distcp", 0, len(rec))
                       for i in range(tensors)}
    (path / ".metadata").write_bytes(pickle.dumps(md))
    return path


def deflated_pickle_pt(path: Path, expanded: int = 2 << 30) -> Path:
    """A ``.pt`` zip whose ``data.pkl`` member is deflated from ``expanded`` bytes (a pickle of one long string)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open("archive/data.pkl", "w", force_zip64=True) as f:
            f.write(b"\x80\x02X" + struct.pack("<I", min(expanded - 8, 0xFFFFFFFF)))
            block = b"A" * (1 << 24)
            left = expanded - 8
            while left > 0:
                f.write(block[: min(left, len(block))])
                left -= len(block)
        z.writestr("archive/version", "3\n")
    return path


def deep_dict_pt(path: Path, depth: int = 5000) -> Path:
    """A torch.save file holding a dict nested ``depth`` levels deep with a tensor at the bottom."""
    obj: object = {"w": torch.ones(1)}
    for _ in range(depth):
        obj = {"d": obj}
    import sys

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, depth * 4 + 1000))
    try:
        torch.save(obj, path)
    finally:
        sys.setrecursionlimit(old)
    return path


def big_declared_safetensors(path: Path, declared: int = 8 << 30) -> Path:
    """A tiny safetensors file whose header declares one ``declared``-byte tensor."""
    import json

    n = declared // 4
    body = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, declared]}}).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(len(body).to_bytes(8, "little") + body + b"\0" * 8)
    return path
