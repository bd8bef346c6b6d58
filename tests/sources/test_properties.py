"""Property tests: random shapes, dtypes, chunkings and strides round-trip exactly; fuzzed
metadata and record bytes give a clean error (or the exact original), never a crash or a hang.

DCP checkpoints here are built by hand with torch's own metadata dataclasses and one
``torch.save`` record per chunk, back to back in one ``.distcp`` file -- the layout
``torch.distributed.checkpoint`` writes -- so any tiling can be tried without a process group.
"""

from __future__ import annotations

import io
import pickle
import shutil
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from shardfix.api import convert
from shardfix.dtypes import ST_TO_TORCH
from shardfix.errors import IncompleteSourceError, ShardfixError
from shardfix.options import ConvertOptions
from shardfix.sources.base import Chunk
from shardfix.sources.dcp import DcpSource
from shardfix.sources.records import decode_record
from shardfix.sources.tiling import check_tiling
from shardfix.verify import verify_output
from tests.conftest import bits_equal

DTYPES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U8", "BOOL", "C64"]
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])

# -- strategies ------------------------------------------------------------------------------------


@st.composite
def tensors(draw: st.DrawFn, max_dims: int = 3, max_dim: int = 7) -> torch.Tensor:
    """A tensor of any supported dtype with arbitrary bit patterns (NaNs, -0.0, subnormals)."""
    dtype = ST_TO_TORCH[draw(st.sampled_from(DTYPES))]
    shape = draw(st.lists(st.integers(0, max_dim), min_size=0, max_size=max_dims))
    n = 1
    for d in shape:
        n *= d
    raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
    if dtype == torch.bool:
        raw = bytes(b & 1 for b in raw)
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return t.view(dtype).reshape(shape)


@st.composite
def tilings(draw: st.DrawFn, shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Guillotine cuts of ``shape`` into boxes: uneven, 2-D, with 0-size boxes, in shuffled order."""
    boxes = [(tuple(0 for _ in shape), tuple(shape))]
    for _ in range(draw(st.integers(0, 5))):
        if not shape:
            break
        i = draw(st.integers(0, len(boxes) - 1))
        offs, sizes = boxes.pop(i)
        dim = draw(st.integers(0, len(shape) - 1))
        cut = draw(st.integers(0, sizes[dim]))  # 0 or the full size makes a 0-size box
        a = list(sizes)
        a[dim] = cut
        b_off = list(offs)
        b_off[dim] += cut
        b = list(sizes)
        b[dim] -= cut
        boxes += [(offs, tuple(a)), (tuple(b_off), tuple(b))]
    return draw(st.permutations(boxes))


def _strided(t: torch.Tensor, how: int) -> torch.Tensor:
    """The same values stored with another layout: transposed storage or a slice of a bigger one."""
    if how == 1 and t.dim() >= 2:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if how == 2 and t.numel():
        big = torch.zeros((t.numel() * 2 + 3,), dtype=t.dtype)
        view = big[3::2][: t.numel()].view(t.shape) if t.dim() else big[3]
        view.copy_(t)
        return view
    return t


def write_dcp(path: Path, tensors_: dict[str, tuple[torch.Tensor, list, list[int]]]) -> None:
    """A DCP directory: ``.metadata`` plus ``__0_0.distcp`` with one torch.save record per box."""
    path.mkdir(parents=True, exist_ok=True)
    sd_meta, storage, planner = {}, {}, {}
    blob = io.BytesIO()
    for key, (t, boxes, layouts) in tensors_.items():
        chunks = []
        for (offs, sizes), how in zip(boxes, layouts, strict=True):
            chunks.append(ChunkStorageMetadata(torch.Size(offs), torch.Size(sizes)))
            if any(s == 0 for s in sizes) and t.dim():
                continue  # DCP keeps no bytes for an empty box
            part = t
            for dim, (o, s) in enumerate(zip(offs, sizes, strict=True)):
                part = part.narrow(dim, o, s)
            start = blob.tell()
            torch.save(_strided(part.clone(), how), blob)
            storage[MetadataIndex(key, torch.Size(offs))] = _StorageInfo("__0_0.distcp", start, blob.tell() - start)
        sd_meta[key] = TensorStorageMetadata(TensorProperties(dtype=t.dtype), torch.Size(t.shape), chunks)
        planner[key] = tuple(key.split("."))
    (path / "__0_0.distcp").write_bytes(blob.getvalue())
    (path / ".metadata").write_bytes(pickle.dumps(Metadata(sd_meta, planner, storage)))


@st.composite
def checkpoints(draw: st.DrawFn) -> dict[str, tuple[torch.Tensor, list, list[int]]]:
    out = {}
    for i in range(draw(st.integers(1, 3))):
        t = draw(tensors())
        boxes = draw(tilings(tuple(t.shape)))
        layouts = draw(st.lists(st.integers(0, 2), min_size=len(boxes), max_size=len(boxes)))
        out[f"model.t{i}"] = (t, boxes, layouts)
    return out


# -- round trips -----------------------------------------------------------------------------------


@FAST
@given(ckpt=checkpoints())
def test_dcp_assembly_round_trip(tmp_path: Path, ckpt: dict) -> None:
    path = tmp_path / "ck"
    shutil.rmtree(path, ignore_errors=True)
    write_dcp(path, ckpt)
    src = DcpSource(path)
    try:
        for key, (t, _, _) in ckpt.items():
            assert bits_equal(src.read_tensor(key), t)
    finally:
        src.close()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(ckpt=checkpoints(), shard=st.sampled_from(["64B", "1KB", "5GB"]))
def test_convert_round_trip_is_exact(tmp_path: Path, ckpt: dict, shard: str) -> None:
    """Through the whole pipeline: plan, stream-write, finish, and ``verify --against``."""
    from safetensors import safe_open

    path, out = tmp_path / "ck", tmp_path / "out"
    shutil.rmtree(path, ignore_errors=True)
    write_dcp(path, ckpt)
    convert(path, out, ConvertOptions(executor="inline", max_shard_size=shard, overwrite=True, progress=False))
    assert verify_output(out, path)[0] == []
    seen = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                assert bits_equal(h.get_tensor(name), ckpt[f"model.{name}"][0])
                seen.add(f"model.{name}")
    assert seen == set(ckpt)


@FAST
@given(t=tensors(), perm_seed=st.integers(0, 10**6), step=st.integers(1, 3))
def test_torch_save_strided_round_trip(tmp_path: Path, t: torch.Tensor, perm_seed: int, step: int) -> None:
    """Permuted and stepped views saved with torch.save come out contiguous and exact."""
    from safetensors import safe_open

    g = torch.Generator().manual_seed(perm_seed)
    view = t.permute(*torch.randperm(t.dim(), generator=g).tolist()) if t.dim() > 1 else t
    if view.dim() and step > 1:
        view = view[::step]
    path, out = tmp_path / "s.pt", tmp_path / "out"
    torch.save({"model": {"w": view}}, path)
    convert(path, out, ConvertOptions(executor="inline", overwrite=True, progress=False))
    with safe_open(str(out / "model.safetensors"), framework="pt") as h:
        assert bits_equal(h.get_tensor("w"), view.contiguous())


@FAST
@given(data=st.data())
def test_tiling_check_accepts_exact_tilings_only(data: st.DataObject) -> None:
    shape = tuple(data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    boxes = data.draw(tilings(shape))
    chunks = [Chunk(o, s) for o, s in boxes]
    check_tiling("k", shape, chunks)
    nonempty = [c for c in chunks if c.numel]
    # drop a box: a gap
    drop = data.draw(st.integers(0, len(nonempty) - 1))
    with pytest.raises(IncompleteSourceError, match="cover"):
        check_tiling("k", shape, [c for c in chunks if c is not nonempty[drop]])
    # duplicate a box: an overlap (or, for a 1-element box, a count mismatch)
    with pytest.raises(IncompleteSourceError, match="overlap|cover"):
        check_tiling("k", shape, [*chunks, nonempty[drop]])
    # move a box by one along some dim: overlap, gap or out of bounds
    dim = data.draw(st.integers(0, len(shape) - 1))
    moved = list(nonempty[drop].offsets)
    moved[dim] += data.draw(st.sampled_from([-1, 1]))
    shifted = Chunk(tuple(moved), nonempty[drop].sizes)
    with pytest.raises(IncompleteSourceError):
        check_tiling("k", shape, [c for c in chunks if c is not nonempty[drop]] + [shifted])


# -- fuzzing ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_dir(fsdp_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fuzz") / "ckpt"
    shutil.copytree(fsdp_ckpt, d)
    return d


def _mutate(data: bytes, draw: st.DrawFn) -> bytes:
    b = bytearray(data)
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite", "zero"]))
    if kind == "truncate":
        return bytes(b[: draw(st.integers(0, len(b) - 1))])
    at = draw(st.integers(0, len(b) - 1))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(b) - 1))
            b[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "insert":
        b[at:at] = draw(st.binary(min_size=1, max_size=16))
    elif kind == "overwrite":
        chunk = draw(st.binary(min_size=1, max_size=16))
        b[at : at + len(chunk)] = chunk
    else:
        b[at : at + draw(st.integers(1, 64))] = bytes(draw(st.integers(1, 64)))
    return bytes(b)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_metadata_is_a_clean_error(fuzz_dir: Path, fsdp_ckpt: Path, data: st.DataObject) -> None:
    mutated = _mutate((fsdp_ckpt / ".metadata").read_bytes(), data.draw)
    (fuzz_dir / ".metadata").write_bytes(mutated)
    t0 = time.monotonic()
    try:
        src = DcpSource(fuzz_dir)
    except ShardfixError as e:
        assert str(e)
    else:  # a harmless mutation (e.g. in a string): the index is still a valid tiling
        assert len(src.index.entries) > 0
        src.close()
    assert time.monotonic() - t0 < 20


@pytest.fixture(scope="module")
def sample_record(fsdp_ckpt: Path) -> tuple[bytes, torch.Tensor]:
    src = DcpSource(fsdp_ckpt)
    try:
        entry = next(e for e in src.index.tensors() if e.key == "model.router.weight")
        c = entry.chunks[0]
        return bytes(src._read(c, entry.key)), src.read_chunk(entry, c)
    finally:
        src.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_record_is_exact_or_a_clean_error(sample_record: tuple[bytes, torch.Tensor], data: st.DataObject) -> None:
    raw, original = sample_record
    mutated = _mutate(raw, data.draw)
    assume(mutated != raw)
    try:
        t = decode_record(bytearray(mutated), (), Path("ck/__0_0.distcp"), "model.router.weight")
    except ShardfixError as e:
        assert "ck/__0_0.distcp" in str(e) and "model.router.weight" in str(e)
    else:  # only bytes torch ignores (timestamps, ...) changed: the value must be exactly the original
        assert bits_equal(t, original)
