"""Where each parameter's elements lie in DeepSpeed ZeRO's per-rank flat partitions (pure functions).

ZeRO-1/2 (:func:`zero12_pieces`): a param group is one flat buffer -- its parameters in
``param_shapes`` order, each followed by its ``param_alignment_paddings`` entry (0 unless
set), the whole padded at the tail to a multiple of ``2 * world_size`` -- cut into ``world_size``
equal partitions, rank r holding partition r. A saved partition may omit its tail padding
(the bf16 optimizer saves the fp32 partition narrowed, its moments whole), so the buffer is the
saved partitions concatenated in rank order, whatever their lengths; padding only ever sits at
the end. A parameter may straddle two (or more) ranks.

ZeRO-3 (:func:`zero3_pieces`): every parameter is partitioned on its own: rank r holds
elements ``[r * p, (r + 1) * p)`` of it, ``p = ceil(numel / world_size)``, the last partition
zero-padded. Rank r's flat groups, concatenated, hold its partitions of every parameter in
``param_shapes`` order.

Both check the element count the way DeepSpeed's ``zero_to_fp32`` does and raise
:class:`~shardfix.errors.BadInputError` naming the group and both counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shardfix.errors import BadInputError


@dataclass(frozen=True, slots=True)
class Piece:
    """``numel`` elements of a parameter, taken from flat tensor ``part`` of rank ``rank`` at ``start``."""

    rank: int
    part: int  # index among the rank's flat tensors (ZeRO-1/2: always the group's one tensor)
    start: int
    numel: int


def align(n: int, to: int) -> int:
    return to * math.ceil(n / to)


def zero3_partition(numel: int, world_size: int) -> tuple[int, int]:
    """``(elements per rank, padding elements)`` of one ZeRO-3 parameter."""
    per_rank = math.ceil(numel / world_size)
    return per_rank, per_rank * world_size - numel


def _cut(start: int, numel: int, bounds: list[int]) -> list[tuple[int, int, int]]:
    """Split the run ``[start, start + numel)`` of a concatenation at ``bounds`` (cumulative
    lengths, starting with 0): ``(index, offset inside it, length)`` per touched segment."""
    out: list[tuple[int, int, int]] = []
    pos, end = start, start + numel
    i = 0
    while pos < end:
        while bounds[i + 1] <= pos:
            i += 1
        take = min(end, bounds[i + 1]) - pos
        out.append((i, pos - bounds[i], take))
        pos += take
    return out


def _bounds(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def zero12_pieces(
    group: int, numels: list[int], rank_lengths: list[int], world_size: int,
    param_paddings: list[int] | None = None, what: str = "fp32 partitions",
) -> list[list[Piece]]:
    """Each parameter's pieces in one ZeRO-1/2 group.

    Args:
        group: the group's index, for messages.
        numels: element counts of the group's parameters, in ``param_shapes`` order.
        rank_lengths: elements of the group's flat tensor saved by each rank, rank order.
        world_size: the data-parallel world size (``partition_count``).
        param_paddings: ``param_alignment_paddings[group]`` when saved.
        what: which flat tensors these are, for messages.

    Raises:
        BadInputError: the parameters need more elements than the ranks hold, or the counts
            differ after alignment to ``2 * world_size`` (DeepSpeed's "consumed X numels out of Y").
    """
    if param_paddings is not None and len(param_paddings) != len(numels):
        raise BadInputError(f"param group {group}: {len(param_paddings)} parameter alignment paddings saved "
                            f"for {len(numels)} parameters; the checkpoint's files disagree")
    bounds = _bounds(rank_lengths)
    total = bounds[-1]
    offset = 0
    starts = []
    for i, n in enumerate(numels):
        starts.append(offset)
        offset += n + (param_paddings[i] if param_paddings else 0)
    consumed = offset
    if consumed > total or align(consumed, 2 * world_size) != align(total, 2 * world_size):
        raise BadInputError(
            f"param group {group}: consumed {consumed} numels out of {total} in the {what} of {len(rank_lengths)} "
            f"ranks (param_shapes declares {sum(numels)} elements); the model-state and optimizer files do not "
            "belong to the same save, or one was altered -- copy the checkpoint again"
        )
    return [[Piece(r, 0, s, k) for r, s, k in _cut(start, n, bounds)] for start, n in zip(starts, numels, strict=True)]


def zero3_pieces(numels: list[int], rank_part_lengths: list[list[int]], world_size: int,
                 what: str = "fp32 flat groups") -> list[list[Piece]]:
    """Each parameter's pieces under ZeRO-3 (all groups, in ``param_shapes`` order).

    Args:
        numels: element counts of every parameter, groups concatenated in order.
        rank_part_lengths: for each rank, the lengths of its flat tensors (sub-groups) in order.
        world_size: the data-parallel world size.
        what: which flat tensors these are, for messages.

    Raises:
        BadInputError: a rank's flat tensors do not hold exactly its partitions of every parameter.
    """
    if len(rank_part_lengths) != world_size:
        raise BadInputError(f"ZeRO-3: {len(rank_part_lengths)} ranks' {what} for a world size of {world_size}")
    per_rank = [zero3_partition(n, world_size)[0] for n in numels]
    need = sum(per_rank)
    for r, lengths in enumerate(rank_part_lengths):
        if sum(lengths) != need:
            raise BadInputError(
                f"ZeRO-3 rank {r} (all param groups): consumed {need} numels out of {sum(lengths)} in its {what} "
                f"(param_shapes declares {sum(numels)} elements over {world_size} ranks); the model-state and "
                "optimizer files do not belong to the same save, or one was altered -- copy the checkpoint again"
            )
    bounds = [_bounds(lengths) for lengths in rank_part_lengths]
    out: list[list[Piece]] = []
    offset = 0
    for n, p in zip(numels, per_rank, strict=True):
        pieces: list[Piece] = []
        left = n
        for r in range(world_size):
            take = min(p, left)
            pieces += [Piece(r, i, s, k) for i, s, k in _cut(offset, take, bounds[r])]
            left -= take
        out.append(pieces)
        offset += p
    return out


def frozen3_pieces(numel: int, fragment_lengths: list[int], world_size: int, name: str) -> list[Piece]:
    """A frozen ZeRO-3 parameter: rank r's ``frozen_param_fragments`` entry is its partition."""
    p, _ = zero3_partition(numel, world_size)
    bad = [r for r, n in enumerate(fragment_lengths) if n != p]
    if len(fragment_lengths) != world_size or bad:
        raise BadInputError(f"frozen parameter {name}: rank fragments of {fragment_lengths} elements, expected "
                            f"{world_size} of {p} (ceil({numel} / {world_size})); the model-state files disagree")
    pieces, left = [], numel
    for r in range(world_size):
        take = min(p, left)
        if take:
            pieces.append(Piece(r, 0, 0, take))
        left -= take
    return pieces
