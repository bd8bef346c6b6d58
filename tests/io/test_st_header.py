"""The one safetensors header parser: real files from the safetensors library, and crafted damage.

Every malformed header must be refused with ``BadInputError`` (exit 2) naming the file (and the
tensor), both by :func:`read_header` and by the safetensors source that uses it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shardfix.errors import BadInputError
from shardfix.io.st_header import MAX_HEADER, build_header, looks_like, read_header
from shardfix.sources import open_source


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.f32": torch.randn(5, 3, generator=g),
        "w.bf16": torch.randn(4, 7, generator=g).to(torch.bfloat16),
        "w.f16": torch.randn(3, generator=g).to(torch.float16),
        "ids.i64": torch.arange(-6, 6, dtype=torch.int64).reshape(3, 4),
        "mask.bool": torch.tensor([True, False, True]),
        "bytes.u8": torch.arange(11, dtype=torch.uint8),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
    }


def _craft(path: Path, header: Any, data: bytes = b"", length: int | None = None) -> Path:
    """Write ``header`` (an object dumped as JSON, or raw bytes) and ``data`` as a safetensors file."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(body) if length is None else length
    path.write_bytes(n.to_bytes(8, "little") + body + data)
    return path


def test_reads_what_the_safetensors_library_writes(tmp_path: Path) -> None:
    tensors = _tensors()
    path = tmp_path / "real.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "x"})
    header = read_header(path)
    assert header.metadata == {"format": "pt", "note": "x"}
    assert set(header.tensors) == set(tensors)
    raw = path.read_bytes()
    assert header.data_start + header.data_len == len(raw)
    with safe_open(str(path), framework="pt") as h:
        for name, info in header.tensors.items():
            want = tensors[name]
            assert list(info.shape) == h.get_slice(name).get_shape() == list(want.shape)
            assert info.dtype == h.get_slice(name).get_dtype()
            got = raw[header.data_start + info.start : header.data_start + info.end]
            flat = want.reshape(-1)
            assert got == (flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""), name
    assert looks_like(raw[:9])


def test_build_header_round_trips_and_the_library_accepts_it(tmp_path: Path) -> None:
    @dataclass(frozen=True)
    class Spec:
        name: str
        dtype: str
        shape: tuple[int, ...]

        @property
        def nbytes(self) -> int:
            n = 1
            for d in self.shape:
                n *= d
            return n * {"BF16": 2, "F32": 4, "I8": 1}[self.dtype]

    specs = [Spec("a", "BF16", (2, 3)), Spec("s", "F32", ()), Spec("z", "I8", (0,)), Spec("c", "I8", (5,))]
    head = build_header(specs, {"format": "pt"})
    assert (len(head) - 8) % 8 == 0
    path = tmp_path / "built.safetensors"
    path.write_bytes(head + bytes(range(sum(s.nbytes for s in specs))))
    header = read_header(path)
    assert list(header.tensors) == ["a", "s", "z", "c"]
    assert [(i.dtype, i.shape, i.start, i.end) for i in header.tensors.values()] == [
        ("BF16", (2, 3), 0, 12), ("F32", (), 12, 16), ("I8", (0,), 16, 16), ("I8", (5,), 16, 21)]
    with safe_open(str(path), framework="pt") as h:
        assert h.get_tensor("c").tolist() == [16, 17, 18, 19, 20]


def _entry(dtype: Any = "F32", shape: Any = (2,), offsets: Any = (0, 8)) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


MALFORMED: dict[str, tuple[Any, bytes, str]] = {
    "overlapping offsets": ({"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(4, 12))}, bytes(12), "overlap"),
    "string offsets": ({"a": _entry(offsets=["0", "8"])}, bytes(8), "not two integers"),
    "float offsets": ({"a": _entry(offsets=[0.0, 8.0])}, bytes(8), "not two integers"),
    "one offset": ({"a": _entry(offsets=[8])}, bytes(8), "not two integers"),
    "null offsets": ({"a": _entry(offsets=None)}, bytes(8), "not two integers"),
    "NaN shape": (b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}', bytes(8), "shape"),
    "negative shape": ({"a": _entry(shape=[-2])}, bytes(8), "shape"),
    "float shape": ({"a": _entry(shape=[2.0])}, bytes(8), "shape"),
    "bool shape": ({"a": _entry(shape=[True, True])}, bytes(8), "shape"),
    "shape not a list": ({"a": _entry(shape="2")}, bytes(8), "shape"),
    "entry is a list": ({"a": [0, 8]}, bytes(8), "not an object"),
    "entry is a string": ({"a": "F32"}, bytes(8), "not an object"),
    "end past the data": ({"a": _entry(offsets=(0, 8))}, bytes(4), "spans bytes 0..8 of a 4-byte data section"),
    "start after end": ({"a": _entry(shape=(0,), offsets=(8, 0))}, bytes(8), "spans bytes 8..0"),
    "negative start": ({"a": _entry(shape=(0,), offsets=(-1, -1))}, bytes(8), "spans bytes -1..-1"),
    "offsets disagree with shape": ({"a": _entry(offsets=(0, 4))}, bytes(8), "needs 8"),
    "unknown dtype": ({"a": _entry(dtype="F99")}, bytes(8), "unknown dtype 'F99'"),
    "dtype not a string": ({"a": _entry(dtype=4)}, bytes(8), "unknown dtype 4"),
    "header is a list": ([{"a": 1}], b"", "not a JSON object"),
    "not JSON": (b'{"a": {"dtype": "F32", ', bytes(8), "corrupt safetensors header"),
    "not UTF-8": (b'{"\xff\xfe": 1}', b"", "corrupt safetensors header"),
    "metadata not strings": ({"__metadata__": {"format": 1}}, b"", "__metadata__"),
    "metadata a list": ({"__metadata__": ["pt"]}, b"", "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_header_is_bad_input_naming_the_file(tmp_path: Path, case: str) -> None:
    header, data, words = MALFORMED[case]
    path = _craft(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(BadInputError, match=str(path)) as err:
        read_header(path)
    assert words in str(err.value), (case, str(err.value))
    with pytest.raises(BadInputError, match=str(path)):  # what `shardfix convert/inspect` run into
        open_source(path)


def test_tensor_named_in_entry_errors(tmp_path: Path) -> None:
    path = _craft(tmp_path / "bad.safetensors", {"good": _entry(), "layers.3.w": _entry(shape=[-1])}, bytes(8))
    with pytest.raises(BadInputError, match=r"tensor layers\.3\.w: shape \[-1\]"):
        read_header(path)


@pytest.mark.parametrize("length", ["file + 1", 1 << 40, MAX_HEADER + 1])
def test_header_length_larger_than_the_file(tmp_path: Path, length: int | str) -> None:
    body = json.dumps({"a": _entry()}).encode()
    if length == "file + 1":  # one byte more than the file holds after the length prefix
        length = len(body) + 8 + 1
    path = _craft(tmp_path / "long.safetensors", body, bytes(8), length=int(length))
    with pytest.raises(BadInputError, match=f"{path}: header length {length} does not fit the file"):
        read_header(path)


def test_too_short_and_missing(tmp_path: Path) -> None:
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x10\x00\x00")
    with pytest.raises(BadInputError, match=f"{short}: too short to be safetensors"):
        read_header(short)
    with pytest.raises(BadInputError, match="cannot read"):
        read_header(tmp_path / "absent.safetensors")


def test_gaps_and_empty_tensors_are_fine(tmp_path: Path) -> None:
    """Only overlap is refused: a gap between tensors, or an empty tensor inside another's bytes, is not."""
    header = {"a": _entry(offsets=(0, 8)), "e": _entry(shape=(0,), offsets=(4, 4)), "b": _entry(offsets=(12, 20))}
    parsed = read_header(_craft(tmp_path / "gaps.safetensors", header, bytes(20)))
    assert {k: (v.start, v.end) for k, v in parsed.tensors.items()} == {"a": (0, 8), "e": (4, 4), "b": (12, 20)}
    assert parsed.metadata is None
