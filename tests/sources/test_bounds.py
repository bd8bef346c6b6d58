"""Tiling and bounds at scale: O(n log n) tiling checks, element-bounded metadata (no subprocesses)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from shardfix.errors import BadInputError, IncompleteSourceError
from shardfix.sources.base import Chunk
from shardfix.sources.tiling import check_tiling
from shardfix.sources.torchsave import _flatten
from tests.sources import crafted_inputs as ci


@pytest.mark.slow
@pytest.mark.parametrize("dim,n", [(1, 16_000), (0, 400_000)])
def test_tiling_many_boxes_is_fast(dim: int, n: int) -> None:
    shape, boxes = ci.boxes_along(dim, n)
    chunks = [Chunk(o, s) for o, s in boxes]
    t = time.perf_counter()
    check_tiling("w", shape, chunks)
    assert time.perf_counter() - t < 10  # was 151 s (dim 1, 16k) and quadratic
    chunks[n // 2] = Chunk(chunks[n // 2 - 1].offsets, chunks[n // 2].sizes)
    with pytest.raises(IncompleteSourceError, match="overlap"):
        check_tiling("w", shape, chunks)


def test_irregular_tiling_falls_back_and_is_exact() -> None:
    # rows split differently in each column: the grid is finer than the boxes but still checked exactly
    boxes = [Chunk((0, 0), (3, 2)), Chunk((3, 0), (5, 2)), Chunk((0, 2), (5, 2)), Chunk((5, 2), (3, 2))]
    check_tiling("w", (8, 4), boxes)
    with pytest.raises(IncompleteSourceError, match="overlap"):
        check_tiling("w", (8, 4), [*boxes[:3], Chunk((4, 2), (4, 2))])
    with pytest.raises(IncompleteSourceError, match="cover"):
        check_tiling("w", (8, 4), boxes[:3])


def test_memoised_chunk_lists_refused_before_iterating(tmp_path: Path) -> None:
    from shardfix.sources.dcp import DcpSource

    d = ci.memo_chunk_metadata(tmp_path / "ck")
    t = time.perf_counter()
    with pytest.raises(BadInputError, match="chunk boxes"):
        DcpSource(d)
    assert time.perf_counter() - t < 10


@pytest.mark.slow
def test_flatten_is_bounded_in_depth_and_nodes() -> None:
    deep: object = 1
    for _ in range(5000):
        deep = {"d": deep}
    with pytest.raises(BadInputError, match="nested"):
        _flatten(deep, (), [], Path("deep.pt"))
    shared = list(range(1000))
    wide = {str(i): {"x": shared, "y": [{"z": shared}] * 1000} for i in range(100)}
    import shardfix.sources.torchsave as ts

    old, ts.MAX_NODES = ts.MAX_NODES, 50_000
    try:
        with pytest.raises(BadInputError, match="entries"):
            _flatten(wide, (), [], Path("wide.pt"))
    finally:
        ts.MAX_NODES = old
