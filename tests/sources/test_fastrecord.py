"""The DCP record fast path: every tensor it reads must equal ``torch.load`` of the same record."""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from shardfix.sources import fastrecord
from shardfix.sources.dcp import DcpSource
from tests.conftest import bits_equal

GARBAGE = b"\x00not-a-record\xff" * 7  # records sit at arbitrary offsets inside .distcp files


def saved(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def place(tmp_path: Path, record: bytes) -> tuple[int, int, int]:
    """Write ``record`` between junk bytes, as DCP does; return (fd, offset, length)."""
    path = tmp_path / "records.distcp"
    path.write_bytes(GARBAGE + record + GARBAGE)
    return os.open(path, os.O_RDONLY), len(GARBAGE), len(record)


def fast_read(fd: int, base: int, length: int) -> torch.Tensor | None:
    layout = fastrecord.locate(fd, base, length)
    if layout is None:
        return None
    return fastrecord.read_tensor(fd, base, length, layout.dtype, layout.shape)


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(7, 5, generator=g)
    return {
        "f32": torch.randn(33, 17, generator=g),
        "transposed": base.t(),  # stride (1, 5): read by strides, not as one run
        "bf16": torch.randn(9, 4, generator=g).to(torch.bfloat16),
        "f16-3d": torch.randn(3, 4, 5, generator=g).half(),
        "zero-d": torch.tensor(3.25),
        "zero-d-bf16": torch.tensor(-0.0, dtype=torch.bfloat16),
        "uneven-rows": torch.randn(131, 8, generator=g)[66:],  # a view: storage offset 66 * 8
        "column-slice": base[:, 1:3],  # non-contiguous view with an offset
        "int64": torch.arange(-5, 20, dtype=torch.int64),
        "bool": torch.tensor([True, False, True]),
        "uint16-v3": torch.arange(10, dtype=torch.int32).to(torch.uint16),  # saved with _rebuild_tensor_v3
        "empty": torch.empty(0, 4),
        "nan-inf": torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0]),
        "expanded-stride0": torch.randn(4, 1, generator=g).expand(4, 3),  # stride 0
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_fast_path_matches_torch_load(tmp_path: Path, name: str) -> None:
    record = saved(_cases()[name])
    expected = torch.load(io.BytesIO(record), weights_only=True)
    fd, base, length = place(tmp_path, record)
    try:
        got = fast_read(fd, base, length)
    finally:
        os.close(fd)
    assert got is not None, "a plain torch.save record must take the fast path"
    assert bits_equal(got, expected.contiguous())


def test_read_into_a_noncontiguous_destination(tmp_path: Path) -> None:
    src = torch.randn(6, 4)
    fd, base, length = place(tmp_path, saved(src))
    try:
        layout = fastrecord.locate(fd, base, length)
        assert layout is not None and layout.contiguous_range() is not None
        dest = torch.zeros(6, 10)
        assert fastrecord.read_into(fd, layout, dest[:, 3:7])  # a column block: not contiguous
    finally:
        os.close(fd)
    assert bits_equal(dest[:, 3:7].contiguous(), src)
    assert not dest[:, :3].any() and not dest[:, 7:].any()


def test_layout_points_at_the_raw_bytes(tmp_path: Path) -> None:
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    record = saved(t)
    fd, base, length = place(tmp_path, record)
    try:
        layout = fastrecord.locate(fd, base, length)
        assert layout is not None
        offset, nbytes = layout.contiguous_range()
        assert os.pread(fd, nbytes, offset) == t.numpy().tobytes()
        assert base < offset and offset + nbytes <= base + length
    finally:
        os.close(fd)


def _zip64_everywhere(record: bytes) -> bytes:
    """Rewrite a record's central directory so every size and offset sits in a zip64 extra field.

    That is how an archive holding a >4 GiB storage (or lying past 4 GiB) describes its entries;
    writing one for real would take 4 GiB of memory and disk in a unit test.
    """
    eocd = record.rfind(b"PK\x05\x06")
    loc = eocd - 20
    (z64_off,) = struct.unpack_from("<Q", record, loc + 8)
    count, cd_size, cd_off = struct.unpack_from("<QQQ", record, z64_off + 32)
    cd = record[cd_off : cd_off + cd_size]
    out, pos = bytearray(), 0
    for _ in range(count):
        fixed = bytearray(cd[pos : pos + 46])
        nlen, xlen, clen = struct.unpack_from("<HHH", fixed, 28)
        csize, usize = struct.unpack_from("<II", fixed, 20)
        (lho,) = struct.unpack_from("<I", fixed, 42)
        name = cd[pos + 46 : pos + 46 + nlen]
        extra = struct.pack("<HHQQQ", 1, 24, usize, csize, lho)
        struct.pack_into("<II", fixed, 20, 0xFFFFFFFF, 0xFFFFFFFF)
        struct.pack_into("<I", fixed, 42, 0xFFFFFFFF)
        struct.pack_into("<H", fixed, 30, len(extra))
        struct.pack_into("<H", fixed, 32, 0)
        out += fixed + name + extra
        pos += 46 + nlen + xlen + clen
    z64 = bytearray(record[z64_off : z64_off + 56])
    struct.pack_into("<QQQ", z64, 32, count, len(out), cd_off)
    new_z64_off = cd_off + len(out)
    locator = bytearray(record[loc : loc + 20])
    struct.pack_into("<Q", locator, 8, new_z64_off)
    end = bytearray(record[eocd : eocd + 22])
    struct.pack_into("<HHII", end, 8, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    return record[:cd_off] + bytes(out) + bytes(z64) + bytes(locator) + bytes(end)


def test_zip64_extra_fields(tmp_path: Path) -> None:
    t = torch.randn(5, 3)
    record = _zip64_everywhere(saved(t))
    expected = torch.load(io.BytesIO(record), weights_only=True)  # torch reads the rewrite too
    assert bits_equal(expected, t)
    fd, base, length = place(tmp_path, record)
    try:
        got = fast_read(fd, base, length)
    finally:
        os.close(fd)
    assert got is not None and bits_equal(got, t)


def _deflated(record: bytes) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(record))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    return buf.getvalue()


def test_declines_what_it_does_not_understand(tmp_path: Path) -> None:
    record = saved(torch.randn(4, 4))
    cases = {
        "deflated": _deflated(record),
        "truncated": record[:-30],
        "garbage": os.urandom(len(record)),
        "tiny": b"PK",
        "zstd-magic": b"\x28\xb5\x2f\xfd" + record,
        "a dict": saved({"a": torch.ones(2)}),
        "two tensors": saved([torch.ones(2), torch.zeros(2)]),
    }
    for name, data in cases.items():
        fd, base, length = place(tmp_path, data)
        try:
            assert fastrecord.locate(fd, base, length) is None, name
        finally:
            os.close(fd)


def test_pickle_is_never_executed(tmp_path: Path) -> None:
    """A record whose data.pkl calls os.system is declined without running anything."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, (f"touch {marker}",))

    record = bytearray(saved(torch.ones(3)))
    z = zipfile.ZipFile(io.BytesIO(bytes(record)))
    pkl_name = next(n for n in z.namelist() if n.endswith("data.pkl"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as dst:
        for info in z.infolist():
            data = pickle.dumps(Evil(), protocol=2) if info.filename == pkl_name else z.read(info.filename)
            dst.writestr(info.filename, data)
    fd, base, length = place(tmp_path, buf.getvalue())
    try:
        assert fastrecord.locate(fd, base, length) is None
    finally:
        os.close(fd)
    assert not marker.exists()
    with pytest.raises(Exception):
        fastrecord.parse_pickle(pickle.dumps(Evil(), protocol=2))
    assert not marker.exists()


# -- through DcpSource ---------------------------------------------------------------------------


def _read_all(src: DcpSource) -> dict[str, torch.Tensor]:
    return {e.key: src.read_tensor(e.key) for e in src.index.tensors()}


def test_dcp_fast_path_equals_decoding(fsdp_ckpt: Path, reference: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP2 records (uneven rows, a 0-size chunk, bf16, 0-d steps) read fast == torch.load path == truth."""
    src = DcpSource(fsdp_ckpt)
    fast = _read_all(src)
    calls = []
    real = fastrecord.locate
    monkeypatch.setattr(fastrecord, "locate", lambda *a: calls.append(a) or None)
    slow = _read_all(DcpSource(fsdp_ckpt))
    monkeypatch.setattr(fastrecord, "locate", real)
    assert calls, "the fallback run must have asked the fast path first"
    assert fast.keys() == slow.keys()
    for k in fast:
        assert bits_equal(fast[k], slow[k]), k
    for name, t in reference["model"].items():
        assert bits_equal(fast[f"model.{name}"], t), name


def test_dcp_byte_ranges_hold_the_tensor(fsdp_ckpt: Path) -> None:
    src = DcpSource(fsdp_ckpt)
    streamable = 0
    for e in src.index.tensors():
        ranges = src.byte_ranges(e.key)
        if ranges is None:
            continue
        streamable += 1
        data = b"".join(os.pread(r.fd, r.nbytes, r.offset) for r in ranges)
        assert data == src.read_tensor(e.key).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), e.key
    assert streamable == sum(1 for _ in src.index.tensors()), "FSDP2 row shards are all plain runs"


def test_dcp_noncontiguous_records(tmp_path: Path) -> None:
    """DCP keeps a transposed tensor's strides in its record; the fast path reads it by strides."""
    import torch.distributed.checkpoint as dcp

    sd = {
        "w_t": torch.randn(6, 4).t(),
        "bf16_t": torch.randn(5, 3).to(torch.bfloat16).t(),
        "step": torch.tensor(7.0),
        "plain": torch.randn(3, 2),
    }
    dcp.save(sd, checkpoint_id=tmp_path / "ck", no_dist=True)
    src = DcpSource(tmp_path / "ck")
    entries = {e.key: e for e in src.index.tensors()}
    layout = src._layout(entries["w_t"].chunks[0])
    assert layout is not None and layout.stride == (1, 4), "the strided record takes the fast path"
    for key, t in sd.items():
        assert bits_equal(src.read_tensor(key), t.contiguous()), key
    assert src.byte_ranges("w_t") is None  # strided: assembled, not streamed
    assert src.byte_ranges("plain") is not None


@pytest.mark.slow
def test_dcp_column_shards(tmp_path: Path) -> None:
    """Tensor-parallel style shards (dim 1) are assembled in place; equal to the DCP loader's result."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from shardfix.examples.synthetic import make_checkpoint

    ck = make_checkpoint(tmp_path / "ck", 400_000, shard_dim=1)
    dcp_to_torch_save(ck, tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    src = DcpSource(ck)
    for name, t in full["model"].items():
        assert bits_equal(src.read_tensor(f"model.{name}"), t), name
        if t.dim() == 2:
            assert src.byte_ranges(f"model.{name}") is None
    for name, st in full["optim"]["state"].items():
        for k, t in st.items():
            assert bits_equal(src.read_tensor(f"optim.state.{name}.{k}"), t), (name, k)
