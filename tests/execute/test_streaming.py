"""Streaming tensors file to file: byte windows, the writer's copy path, its verification."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import load_file

from shardfix import execute
from shardfix.api import convert
from shardfix.errors import IncompleteSourceError, OutputError
from shardfix.execute import choose as execute_choose
from shardfix.execute import task as execute_task
from shardfix.options import ConvertOptions
from shardfix.outputs import writer as safetensors_io
from shardfix.outputs.writer import StreamingWriter, TensorSpec, file_checksum
from shardfix.reconcile import ops as O
from shardfix.reconcile.ops import apply_ops, byte_window
from shardfix.sources.base import ByteRange
from shardfix.verify import verify_output
from tests.conftest import bits_equal


@pytest.mark.parametrize(
    ("shape", "ops"),
    [
        ((8, 3), []),
        ((8, 3), [O.narrow(0, 2, 5)]),  # vocab trim
        ((3, 4, 2), [O.select(0, 1)]),  # one part of a fused weight
        ((3, 4, 2), [O.select(0, -1)]),
        ((1, 6, 2), [O.narrow(1, 1, 3)]),  # leading size-1 dims keep it one run
        ((4, 6), [O.reshape([24]), O.narrow(0, 6, 12)]),
        ((5,), [O.narrow(0, 0, 0)]),
        ((), []),
    ],
)
def test_byte_window_is_the_bytes_apply_ops_returns(shape: tuple[int, ...], ops: list) -> None:
    t = torch.arange(max(1, torch.Size(shape).numel()), dtype=torch.float32).reshape(shape)
    window = byte_window(shape, 4, ops)
    assert window is not None
    raw = t.reshape(-1).view(torch.uint8)
    expected = apply_ops(t, ops).contiguous().reshape(-1).view(torch.uint8)
    assert torch.equal(raw[window[0] : window[1]], expected)


@pytest.mark.parametrize(
    "ops",
    [[O.narrow(1, 0, 2)], [O.transpose(0, 1)], [O.cast("BF16")], [O.blocks(0, 2, 1, 4)], [O.grow(0, 10, "zeros")],
     [O.value(1.0, "F32")]],
)
def test_byte_window_refuses_ops_that_compute(ops: list) -> None:
    assert byte_window((8, 3), 4, ops) is None


def test_clip_ranges() -> None:
    p = Path("x")
    ranges = [ByteRange(3, 100, 10, p), ByteRange(4, 0, 5, p), ByteRange(3, 500, 20, p)]
    assert execute.clip_ranges(ranges, 0, 35) == ranges
    assert execute.clip_ranges(ranges, 8, 17) == [ByteRange(3, 108, 2, p), ByteRange(4, 0, 5, p), ByteRange(3, 500, 2, p)]
    assert execute.clip_ranges(ranges, 10, 15) == [ByteRange(4, 0, 5, p)]
    assert execute.clip_ranges(ranges, 12, 12) == []


def _source_file(tmp_path: Path, data: bytes) -> int:
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def test_write_ranges_equals_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Copying a tensor's bytes from files gives the same file and checksums as writing the tensor."""
    monkeypatch.setattr(safetensors_io, "BLOCK", 4096)  # many blocks, partial last block
    t = torch.randn(3000, 7)
    raw = t.numpy().tobytes()
    fd = _source_file(tmp_path, b"junk" + raw[:5000] + b"gap!" + raw[5000:])
    ranges = [ByteRange(fd, 4, 5000, tmp_path / "src.bin"), ByteRange(fd, 5008, len(raw) - 5000, tmp_path / "src.bin")]
    specs = [TensorSpec("a", "F32", (3000, 7)), TensorSpec("s", "F32", ())]
    with StreamingWriter(tmp_path / "copied.safetensors", specs) as w:
        copied_a = w.write_ranges("a", "F32", (3000, 7), ranges)
        w.write("s", torch.tensor(2.5))
        copied = w.finish(verify=True)
    os.close(fd)
    with StreamingWriter(tmp_path / "written.safetensors", specs) as w:
        written_a = w.write("a", t)
        w.write("s", torch.tensor(2.5))
        written = w.finish(verify=True)
    assert (tmp_path / "copied.safetensors").read_bytes() == (tmp_path / "written.safetensors").read_bytes()
    assert copied.checksum == written.checksum == file_checksum(tmp_path / "copied.safetensors")
    assert copied_a.checksum == written_a.checksum == xxhash.xxh3_64_hexdigest(raw)
    assert bits_equal(load_file(tmp_path / "copied.safetensors")["a"], t)


def test_write_ranges_reports_a_truncated_source(tmp_path: Path) -> None:
    fd = _source_file(tmp_path, b"\x00" * 100)
    specs = [TensorSpec("a", "F32", (50,))]
    with pytest.raises(IncompleteSourceError, match="truncated"):
        with StreamingWriter(tmp_path / "o.safetensors", specs) as w:
            w.write_ranges("a", "F32", (50,), [ByteRange(fd, 0, 200, tmp_path / "src.bin")])
    os.close(fd)
    assert not list(tmp_path.glob(".o.safetensors.tmp-*")), "the temporary file is removed"


def test_verify_catches_a_bad_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that lands different bytes than were hashed fails the re-read, and nothing is left."""
    real = safetensors_io._write_all

    def flip_a_bit(fd: int, data: memoryview) -> None:
        data = bytearray(data)
        data[-1] ^= 1
        real(fd, memoryview(data))

    specs = [TensorSpec("a", "F32", (10,))]
    with pytest.raises(OutputError, match="re-read checksum"):
        with StreamingWriter(tmp_path / "o.safetensors", specs) as w:
            monkeypatch.setattr(safetensors_io, "_write_all", flip_a_bit)
            w.write("a", torch.ones(10))
            w.finish(verify=True)
    assert not (tmp_path / "o.safetensors").exists()
    assert not list(tmp_path.glob(".o.safetensors.tmp-*"))


def test_convert_streams_and_matches_the_assembling_path(
    fsdp_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opts = ConvertOptions(vocab_size=1000, executor="inline", progress=False, max_shard_size="40KB")
    report = convert(fsdp_ckpt, tmp_path / "fast", opts)
    assert report["status"] == "complete"
    problems, _ = verify_output(tmp_path / "fast", against=fsdp_ckpt)
    assert problems == []
    monkeypatch.setattr(execute_task, "stream_ranges", lambda *a: None)
    convert(fsdp_ckpt, tmp_path / "slow", opts)
    fast = sorted(p.name for p in (tmp_path / "fast").glob("*.safetensors"))
    assert len(fast) > 2 and fast == sorted(p.name for p in (tmp_path / "slow").glob("*.safetensors"))
    for name in fast:
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "slow" / name).read_bytes(), name


def test_most_tensors_are_streamed(fsdp_ckpt: Path, tmp_path: Path) -> None:
    """Every tensor that only needs bytes copied (trims included) is streamed, none assembled."""
    ctx_plan = convert(fsdp_ckpt, tmp_path / "o", ConvertOptions(vocab_size=1000, executor="inline", progress=False))
    staged = ctx_plan["outputs"]["files"]
    total = sum(len(f["tensors"]) for f in staged)
    computed = sum(1 for f in staged for t in f["tensors"]
                   if any(op["op"] not in ("narrow", "select", "reshape") for op in t["ops"]))
    streamed = sum(f.get("streamed_tensors", 0) for f in staged)
    assert streamed == total - computed and streamed > 0


def _plan_of(nbytes: int, files: int):  # noqa: ANN202 - a stand-in with the two fields used
    from types import SimpleNamespace

    return SimpleNamespace(files=[None] * files, total_bytes=nbytes)


def test_auto_executor_weighs_ray_start_against_the_work(monkeypatch: pytest.MonkeyPatch) -> None:
    choose = execute.choose_executor
    assert choose(_plan_of(10**9, 2), "ray", None, None) == ("ray", "--executor ray")
    assert choose(_plan_of(10**9, 2), "auto", None, "ray://head:10001")[0] == "ray"
    monkeypatch.setattr(execute_choose, "usable_cpus", lambda: 2)
    kind, why = choose(_plan_of(10**9, 2), "auto", None, None)
    assert kind == "inline" and "Ray" in why
    assert choose(_plan_of(10**12, 1), "auto", None, None)[0] == "inline"  # one file, one task
    monkeypatch.setattr(execute_choose, "usable_cpus", lambda: 16)
    assert choose(_plan_of(5 * 10**9, 8), "auto", None, None)[0] == "inline"  # start-up outweighs it
    kind, why = choose(_plan_of(200 * 10**9, 40), "auto", None, None)
    assert kind == "ray" and "4 files at a time" in why  # capped by what a disk absorbs
    assert choose(_plan_of(200 * 10**9, 40), "auto", 1, None)[0] == "inline"


def _flip_a_streamed_byte(ckpt: Path, key: str, where: float) -> None:
    from shardfix.sources.dcp import DcpSource

    src = DcpSource(ckpt)
    r = src.byte_ranges(key)[-1]
    path, at = r.origin, r.offset + min(int(r.nbytes * where), r.nbytes - 1)
    src.close()
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize(
    ("key", "where"),
    [("model.router.weight", 0.5), ("model.embed.weight", 0.5), ("model.embed.weight", 1.0)],
    ids=["whole", "trimmed-kept-row", "trimmed-away-row"],  # the CRC covers rows the trim drops too
)
def test_streamed_bytes_are_crc_checked(fsdp_ckpt: Path, tmp_path: Path, key: str, where: float) -> None:
    import shutil

    from shardfix.sources.dcp import DcpSource

    ckpt = tmp_path / "ck"
    shutil.copytree(fsdp_ckpt, ckpt)
    _flip_a_streamed_byte(ckpt, key, where)
    with pytest.raises(IncompleteSourceError, match="fails its CRC-32 check"):
        convert(ckpt, tmp_path / "o", ConvertOptions(vocab_size=1000, executor="inline", progress=False))
    assert not list((tmp_path / "o" / execute.STAGING).glob("*.safetensors")), "no damaged file is staged"
    with pytest.raises(IncompleteSourceError, match="fails its CRC-32 check"):
        DcpSource(ckpt).read_tensor(key)  # the assembling path: the fast read declines, decoding names it


def test_evidence_reads_embedding_moments_in_row_blocks(fsdp_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Evidence's untrained-row scan reads row blocks (bounded memory) and agrees with reading it whole."""
    from shardfix.plan import evidence
    from shardfix.sources.dcp import DcpSource

    src = DcpSource(fsdp_ckpt)
    key = "optim.state.embed.weight.exp_avg_sq"
    whole = (src.read_tensor(key).reshape(1024, -1) != 0).any(dim=1)
    monkeypatch.setattr(evidence, "_ROW_BLOCK", 1000)  # several reads per chunk, a partial last block
    monkeypatch.setattr(src, "read_tensor", lambda k: pytest.fail("read the tensor whole"))
    blocks = evidence._rows_with_nonzero(src, key)
    assert torch.equal(blocks, whole) and 0 < int(blocks.sum()) < 1024
