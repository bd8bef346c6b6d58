"""Decoding DCP chunk records (byte ranges are read with :mod:`shardfix.io.preads`).

A record is a complete ``torch.save`` zip archive, optionally inside a zstd frame. Decoding is
always ``weights_only=True``. Failures name the file and key and say what to do.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import torch

from shardfix.errors import BadInputError, IncompleteSourceError, UnsafeInputError
from shardfix.io.safe_pickle import is_weights_only_refusal, refused_global
from shardfix.io.zipdir import check_zip_record

ZIP_MAGIC = b"PK\x03\x04"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_DESCRIPTOR = "stream.zstd"
#: Bytes a torch.save archive adds around its tensor's storage (pickle, version, headers), generously.
RECORD_OVERHEAD = 1 << 20


def is_zstd(head: bytes | bytearray, transforms: Sequence[str]) -> bool:
    """Whether a record (its first 4 bytes in ``head``) is zstd-compressed."""
    return any(t.startswith(ZSTD_DESCRIPTOR) for t in transforms) or bytes(head[:4]) == ZSTD_MAGIC


def _unzstd(raw: bytes | bytearray, origin: Path, key: str, max_bytes: int | None) -> bytes:
    """Decompress a zstd record, never past ``max_bytes`` (what the record's box can need)."""
    try:
        import zstandard
    except ImportError:
        raise BadInputError(
            f"{origin}: the record for {key} is zstd-compressed; install the zstandard package "
            "(pip install zstandard) to read it"
        ) from None
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)) as r:
            if max_bytes is None:
                return r.read()
            parts, got = [], 0
            while got <= max_bytes:
                part = r.read(min(1 << 24, max_bytes + 1 - got))
                if not part:
                    break
                parts.append(part)
                got += len(part)
            data = b"".join(parts)
    except zstandard.ZstdError as e:
        raise IncompleteSourceError(f"{origin}: corrupt zstd record for {key}: {e}") from e
    if len(data) > max_bytes:
        raise IncompleteSourceError(
            f"{origin}: the zstd record for {key} expands past {max_bytes:,} bytes, more than its box can hold; "
            "the record is corrupt or crafted (decompression stopped there)"
        )
    return data


def record_limit(box_bytes: int) -> int:
    """The most bytes a decompressed record of a ``box_bytes`` box may hold: the box (twice, for a view
    of a larger storage) plus the archive's own members."""
    return 2 * box_bytes + RECORD_OVERHEAD


def decode_record(
    raw: bytes | bytearray, transforms: Sequence[str], origin: Path, key: str, max_bytes: int | None = None
) -> torch.Tensor:
    """Turn one record's bytes into the tensor it holds; a compressed record expands to at most ``max_bytes``."""
    data: bytes | bytearray = raw
    if is_zstd(raw, transforms):
        data = _unzstd(raw, origin, key, max_bytes)
    unknown = [t for t in transforms if not t.startswith(ZSTD_DESCRIPTOR)]
    if unknown:
        raise BadInputError(f"{origin}: record for {key} uses unsupported transforms {unknown}")
    if data[:4] != ZIP_MAGIC:
        raise IncompleteSourceError(
            f"{origin}: the record for {key} is not a torch.save archive (starts with "
            f"{bytes(data[:4])!r}); the file is corrupt or the metadata belongs to another save"
        )
    check_zip_record(data, origin, key)  # torch.load checks no CRC and no record length
    try:
        value = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:
        if is_weights_only_refusal(e):
            raise UnsafeInputError(
                f"{origin}: the record for {key} references {refused_global(e)}, which a tensor record never "
                "does; it was refused (records are loaded with weights_only=True) and nothing in it ran"
            ) from None
        raise IncompleteSourceError(
            f"{origin}: corrupt record for {key} ({type(e).__name__}: {str(e)[:300]}); copy the file again"
        ) from e
    if not isinstance(value, torch.Tensor):
        raise IncompleteSourceError(f"{origin}: record for {key} holds {type(value).__name__}, not a tensor")
    return value
