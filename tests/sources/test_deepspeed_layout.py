"""The ZeRO partition and padding arithmetic of shardfix.sources.deepspeed_layout (no DeepSpeed needed)."""

from __future__ import annotations

import pytest

from shardfix.errors import BadInputError
from shardfix.sources.deepspeed_layout import Piece, frozen3_pieces, zero3_partition, zero3_pieces, zero12_pieces


def test_zero12_straddle_and_tail_padding() -> None:
    # 7 + 5 + 7 = 19 elements, aligned to 2 * 2 = 20, two partitions of 10: the 5-vector straddles
    lay = zero12_pieces(1, [7, 5, 7], [10, 10], 2)
    assert lay == [[Piece(0, 0, 0, 7)], [Piece(0, 0, 7, 3), Piece(1, 0, 0, 2)], [Piece(1, 0, 2, 7)]]


def test_zero12_partition_saved_without_its_padding() -> None:
    # the bf16 optimizer saves rank 1's fp32 partition narrowed (65 of 66 elements)
    assert zero12_pieces(0, [66, 30, 35], [66, 65], 2) == [[Piece(0, 0, 0, 66)], [Piece(1, 0, 0, 30)],
                                                             [Piece(1, 0, 30, 35)]]


def test_zero12_param_alignment_paddings_skip_elements() -> None:
    lay = zero12_pieces(0, [3, 4], [4, 4], 2, param_paddings=[1, 0])
    assert lay == [[Piece(0, 0, 0, 3)], [Piece(1, 0, 0, 4)]]


def test_zero12_parameter_over_three_ranks() -> None:
    assert zero12_pieces(0, [10], [4, 4, 4], 3) == [[Piece(0, 0, 0, 4), Piece(1, 0, 0, 4), Piece(2, 0, 0, 2)]]


@pytest.mark.parametrize(("numels", "lengths"), [([7, 5, 9], [10, 9]), ([7, 5], [10, 10]), ([1], [4, 4])])
def test_zero12_count_mismatch_names_group_and_counts(numels: list[int], lengths: list[int]) -> None:
    with pytest.raises(BadInputError, match=rf"param group 3: consumed {sum(numels)} numels out of {sum(lengths)}"):
        zero12_pieces(3, numels, lengths, 2)


def test_zero12_paddings_must_match_parameters() -> None:
    with pytest.raises(BadInputError, match="param group 0: 1 parameter alignment paddings saved for 2"):
        zero12_pieces(0, [2, 2], [2, 2], 2, param_paddings=[0])


def test_zero3_partition_is_ceil_with_tail_padding() -> None:
    assert zero3_partition(35, 2) == (18, 1)
    assert zero3_partition(66, 2) == (33, 0)
    assert zero3_partition(5, 4) == (2, 3)


def test_zero3_each_parameter_split_over_ranks() -> None:
    # 7 -> 4 + 3 (1 padding), 5 -> 3 + 2 (1 padding): each rank holds 4 + 3 = 7 elements
    lay = zero3_pieces([7, 5], [[7], [7]], 2)
    assert lay == [[Piece(0, 0, 0, 4), Piece(1, 0, 0, 3)], [Piece(0, 0, 4, 3), Piece(1, 0, 4, 2)]]


def test_zero3_parameter_spanning_sub_groups() -> None:
    # rank tensors cut at 3: the second parameter's partition crosses from sub-group 0 into 1
    lay = zero3_pieces([4, 4], [[3, 1], [3, 1]], 2)
    assert lay[1] == [Piece(0, 0, 2, 1), Piece(0, 1, 0, 1), Piece(1, 0, 2, 1), Piece(1, 1, 0, 1)]


def test_zero3_tiny_parameter_leaves_last_ranks_empty() -> None:
    assert zero3_pieces([1], [[1], [1], [1]], 3) == [[Piece(0, 0, 0, 1)]]


def test_zero3_count_mismatch_names_rank_and_counts() -> None:
    with pytest.raises(BadInputError, match=r"ZeRO-3 rank 1 \(all param groups\): consumed 7 numels out of 6"):
        zero3_pieces([7, 5], [[7], [6]], 2)


def test_frozen3_fragments() -> None:
    assert frozen3_pieces(15, [8, 8], 2, "w") == [Piece(0, 0, 0, 8), Piece(1, 0, 0, 7)]
    with pytest.raises(BadInputError, match="frozen parameter w"):
        frozen3_pieces(15, [8, 7], 2, "w")
