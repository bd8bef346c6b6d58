"""safetensors headers: the one parser (which validates) and the one builder.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON, then
the data section. The JSON is an object: ``"__metadata__"`` (optional) maps strings to strings;
every other key is a tensor name mapping to ``{"dtype", "shape", "data_offsets": [start, end]}``
with offsets relative to the data section. The safetensors library pads the JSON with spaces
to a multiple of 8 bytes and refuses headers over 100 MB.

:func:`parse` accepts a header only if every tensor entry is an object with a dtype shardfix
knows, a shape of non-negative integers, and integer offsets with ``end - start`` equal to the
shape's bytes, inside the data section, not overlapping another tensor's bytes. Anything else
raises :class:`~shardfix.errors.BadInputError` naming the file and the tensor: a reader never
trusts an offset it has not checked.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import NamedTuple, Protocol

from shardfix.dtypes import ST_TO_TORCH, numel
from shardfix.errors import BadInputError
from shardfix.io.preads import pread_upto
from shardfix.io.regular import open_regular

#: Largest header accepted (the safetensors library's own limit is 100 MB).
MAX_HEADER = 100 * 1024 * 1024
METADATA_KEY = "__metadata__"
_DAMAGED = "the file is damaged or not safetensors; copy it again or re-save it"


class TensorInfo(NamedTuple):
    """One tensor's header entry; ``start``/``end`` are relative to the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Header:
    """A parsed, validated safetensors header.

    Attributes:
        data_start: absolute file offset of the data section (8 + header length).
        data_len: bytes in the data section.
        tensors: every tensor, in header order.
        metadata: the ``__metadata__`` strings, or None when absent.
    """

    data_start: int
    data_len: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None


class SpecLike(Protocol):
    """What :func:`build_header` needs of each tensor."""

    @property
    def name(self) -> str: ...

    @property
    def dtype(self) -> str: ...

    @property
    def nbytes(self) -> int: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


def looks_like(head: bytes) -> bool:
    """Whether a file's first 9 bytes look like a safetensors header (length, then ``{``)."""
    return len(head) >= 9 and head[8:9] == b"{"


def build_header(specs: Sequence[SpecLike], metadata: Mapping[str, str] | None = None) -> bytes:
    """The exact header bytes (length prefix included) for tensors written in ``specs`` order."""
    header: dict[str, object] = {}
    if metadata:
        header[METADATA_KEY] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


def read_header(path: Path) -> Header:
    """Read and validate the header of the safetensors file ``path`` (no tensor data is read).

    Raises:
        BadInputError: the file cannot be read or its header is malformed (see :func:`parse`).
    """
    fd = open_regular(path)
    try:
        return read_header_fd(fd, path)
    finally:
        os.close(fd)


def read_header_fd(fd: int, path: Path | str) -> Header:
    """Like :func:`read_header` for an open descriptor; ``path`` names the file in messages."""
    try:
        size = os.fstat(fd).st_size
        head = pread_upto(fd, 0, 8)
        if len(head) != 8:
            raise BadInputError(f"{path}: too short to be safetensors ({size} bytes); {_DAMAGED}")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or 8 + n > size:
            raise BadInputError(f"{path}: header length {n} does not fit the file ({size} bytes); the file is "
                                f"truncated or not safetensors; copy it again or re-save it")
        body = pread_upto(fd, 8, n)
    except OSError as e:
        raise BadInputError(f"{path}: cannot read ({e.strerror})") from e
    if len(body) != n:
        raise BadInputError(f"{path}: ends inside its {n}-byte header; the file is truncated; copy it again")
    return parse(body, path, size)


def parse(body: bytes | bytearray, path: Path | str, file_size: int) -> Header:
    """Validate the JSON header ``body`` of a ``file_size``-byte file (``body`` starts at byte 8).

    Raises:
        BadInputError: naming ``path`` (and the tensor) when the JSON is not an object, an entry
            is not an object, a dtype is unknown, a shape is not non-negative integers, the
            offsets are not integers, do not match the shape's bytes, leave the data section or
            overlap another tensor's, or ``__metadata__`` is not an object of strings.
    """
    data_start = 8 + len(body)
    data_len = file_size - data_start
    if data_len < 0:
        raise BadInputError(f"{path}: header length {len(body)} does not fit the file ({file_size} bytes); {_DAMAGED}")
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise BadInputError(f"{path}: corrupt safetensors header ({e}); {_DAMAGED}") from e
    if not isinstance(raw, dict):
        raise BadInputError(f"{path}: the safetensors header is {type(raw).__name__}, not a JSON object; {_DAMAGED}")
    metadata = raw.pop(METADATA_KEY, None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise BadInputError(f"{path}: {METADATA_KEY} is not an object of strings; {_DAMAGED}")
    tensors = {name: _entry(path, name, info, data_len) for name, info in raw.items()}
    spans = sorted((t.start, t.end, name) for name, t in tensors.items() if t.end > t.start)
    for (_, a_end, a), (b_start, _, b) in pairwise(spans):
        if b_start < a_end:
            raise BadInputError(f"{path}: tensors {a} and {b} overlap in the data section; {_DAMAGED}")
    return Header(data_start, data_len, tensors, metadata)


def _entry(path: Path | str, name: str, info: object, data_len: int) -> TensorInfo:
    """One tensor's entry, checked on its own (overlaps are checked by :func:`parse`)."""
    where = f"{path}: tensor {name}"
    if not isinstance(info, dict):
        raise BadInputError(f"{where}: its header entry is {type(info).__name__}, not an object; {_DAMAGED}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ST_TO_TORCH:
        raise BadInputError(f"{where}: unknown dtype {dtype!r} (shardfix reads {', '.join(ST_TO_TORCH)}); {_DAMAGED}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise BadInputError(f"{where}: shape {shape!r} is not a list of non-negative integers; {_DAMAGED}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        raise BadInputError(f"{where}: data_offsets {offsets!r} are not two integers; {_DAMAGED}")
    start, end = offsets
    if not 0 <= start <= end <= data_len:
        raise BadInputError(f"{where} spans bytes {start}..{end} of a {data_len}-byte data section; the file is "
                            "truncated or its header is damaged; copy it again or re-save it")
    need = numel(shape) * ST_TO_TORCH[dtype].itemsize
    if end - start != need:
        raise BadInputError(f"{where}: data_offsets {offsets} hold {end - start} bytes, but {dtype} {shape} "
                            f"needs {need}; {_DAMAGED}")
    return TensorInfo(dtype, tuple(shape), start, end)
