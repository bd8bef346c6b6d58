"""Whether a sharded tensor's chunk boxes tile its global shape exactly (DCP metadata, per-rank files).

Pure: works on :class:`~shardfix.sources.base.Chunk` boxes only, reads no file.
"""

from __future__ import annotations

from shardfix.dtypes import numel
from shardfix.errors import IncompleteSourceError
from shardfix.sources.base import Chunk


def check_tiling(key: str, shape: tuple[int, ...], chunks: list[Chunk]) -> None:
    """Raise unless the chunk boxes cover ``shape`` exactly: no gap, no overlap, in bounds."""
    for c in chunks:
        if len(c.offsets) != len(shape) or len(c.sizes) != len(shape):
            raise IncompleteSourceError(
                f"{key}: chunk at {list(c.offsets)} has rank {len(c.sizes)}, tensor has {len(shape)}"
            )
        for o, s, d in zip(c.offsets, c.sizes, shape, strict=True):
            if o < 0 or s < 0 or o + s > d:
                raise IncompleteSourceError(
                    f"{key}: chunk at offsets {list(c.offsets)} sizes {list(c.sizes)} lies outside "
                    f"the tensor's shape {list(shape)}; the metadata is corrupt"
                )
    total = sum(c.numel for c in chunks)
    expected = numel(shape)
    nonempty = sorted((c for c in chunks if c.numel), key=lambda c: c.offsets)
    if shape:
        for i, a in enumerate(nonempty):
            a_end = a.offsets[0] + a.sizes[0]
            for b in nonempty[i + 1 :]:
                if b.offsets[0] >= a_end:
                    break
                if all(
                    max(ao, bo) < min(ao + as_, bo + bs)
                    for ao, as_, bo, bs in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True)
                ):
                    raise IncompleteSourceError(
                        f"{key}: chunks at offsets {list(a.offsets)} and {list(b.offsets)} overlap; "
                        "the metadata is corrupt or merges two different saves"
                    )
    elif len(nonempty) > 1:
        raise IncompleteSourceError(f"{key}: a 0-d tensor has {len(nonempty)} chunks")
    if total != expected:
        raise IncompleteSourceError(
            f"{key}: the chunks cover {total} of {expected} elements of shape {list(shape)}; "
            "a rank's data is missing (for per-rank metadata, every __N.metadata must be present)"
        )
