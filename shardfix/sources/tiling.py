"""Whether a sharded tensor's chunk boxes tile its global shape exactly (DCP metadata, per-rank files).

Pure: works on :class:`~shardfix.sources.base.Chunk` boxes only, reads no file.

Cost is O(n log n) in the number of boxes for the tilings training stacks write: the box edges
along each dim cut the tensor into a grid of cells, and when that grid has at most
:data:`GRID_FACTOR` cells per box (row shards, column shards, 2-D grids, uneven splits) every
box marks its cells and a cell marked twice is an overlap. Only an irregular tiling with far more
cells than boxes falls back to a sweep along dim 0 (a box is compared with the boxes whose rows
it meets).
"""

from __future__ import annotations

import bisect
import itertools
from array import array
from typing import Literal

from shardfix.dtypes import numel
from shardfix.errors import IncompleteSourceError
from shardfix.sources.base import Chunk

#: The grid check is used when the edge grid has at most this many cells per box (plus a little).
GRID_FACTOR = 8


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
    nonempty = [c for c in chunks if c.numel]
    if shape:
        found = _grid_overlap(shape, nonempty)
        pair = _sweep_overlap(nonempty) if found is None else found
        if pair is not False:
            a, b = pair
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


def _grid_overlap(shape: tuple[int, ...], boxes: list[Chunk]) -> tuple[Chunk, Chunk] | Literal[False] | None:
    """Two overlapping boxes, False when none overlap, or None when the edge grid is too fine to use."""
    if len(boxes) < 2:
        return False
    edges = [sorted({0, d, *(c.offsets[i] for c in boxes), *(c.offsets[i] + c.sizes[i] for c in boxes)})
             for i, d in enumerate(shape)]
    cells = 1
    for e in edges:
        cells *= len(e) - 1
        if cells > GRID_FACTOR * len(boxes) + 1024:
            return None
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * (len(edges[i + 1]) - 1)
    owner = array("q", [-1]) * cells
    for n, c in enumerate(boxes):
        spans = [range(bisect.bisect_left(e, o), bisect.bisect_left(e, o + s))
                 for e, o, s in zip(edges, c.offsets, c.sizes, strict=True)]
        for idx in itertools.product(*spans):
            cell = sum(i * st for i, st in zip(idx, strides, strict=True))
            if owner[cell] >= 0:
                return boxes[owner[cell]], c
            owner[cell] = n
    return False


def _sweep_overlap(boxes: list[Chunk]) -> tuple[Chunk, Chunk] | Literal[False]:
    """Two overlapping boxes or False: each box against those whose dim-0 rows start inside its own."""
    ordered = sorted(boxes, key=lambda c: c.offsets)
    for i, a in enumerate(ordered):
        a_end = a.offsets[0] + a.sizes[0]
        for b in ordered[i + 1 :]:
            if b.offsets[0] >= a_end:
                break
            if all(max(ao, bo) < min(ao + as_, bo + bs)
                   for ao, as_, bo, bs in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True)):
                return a, b
    return False
