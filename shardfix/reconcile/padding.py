"""Padding rules: bring a tensor's shape to its target by trimming (or growing) padding.

Each rule is a pure function of shapes. :func:`reconcile_shape` tries them in order and
returns the ops plus a ledger action describing what it did, or a problem string naming the
tensor and both shapes when no rule applies.

Rules:
  * ``vocab``: one dim is the padded vocab (a multiple of 64, or the size the vocab evidence
    names) and the target is the true vocab: keep the first ``V`` rows.
  * ``vocab-transposed``: ``[d, Vp]`` stored, ``[V, d]`` wanted: transpose, then trim.
  * ``vocab-stacked``: ``k`` tables stacked ``[k*Vp, d]`` -> ``[k*V, d]``, trimmed table by table.
  * ``world-size``: a trailing run of padding on one dim, shorter than a world size that
    divides the padded length (``scalars`` 64 -> 60 for 8 GPUs; banks padded to the world size).
  * ``grow`` (only with ``--allow-grow``): a vocab dim smaller than the target is extended; new
    rows are the mean of the existing rows (``--grow-init mean``, the usual choice for new
    tokens) or zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shardfix.reconcile import ops as O

MAX_WORLD = 4096
#: ``--allow-grow`` never grows a dim past ``MAX_GROW_FACTOR * rows + MAX_GROW_SLACK`` (a wrong target, not a vocab).
MAX_GROW_FACTOR = 4
MAX_GROW_SLACK = 1024


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of ``k`` that is at least ``n``."""
    return -(-n // k) * k


def world_sizes_for(padded: int, content: int, limit: int = MAX_WORLD) -> list[int]:
    """World sizes ``ws`` for which padding ``content`` to a multiple of ``ws`` gives ``padded``."""
    if padded < content or content <= 0:
        return []
    return [ws for ws in range(2, min(padded, limit) + 1) if padded % ws == 0 and padded - content < ws]


def looks_padded_vocab(rows: int) -> bool:
    return rows >= 64 and rows % 64 == 0


@dataclass(slots=True)
class ShapeFix:
    ops: list[dict[str, Any]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)


def _trim_action(rule: str, dim: int, before: tuple[int, ...], after: tuple[int, ...], **extra: Any) -> dict[str, Any]:
    return {"action": "trim", "rule": rule, "dim": dim, "from": list(before), "to": list(after), **extra}


def reconcile_shape(
    name: str,
    shape: tuple[int, ...],
    target: tuple[int, ...],
    *,
    vocab: int | None = None,
    padded_vocab: int | None = None,
    allow_grow: bool = False,
    grow_init: str = "mean",
) -> ShapeFix | str:
    """Return the ops that turn ``shape`` into ``target``, or a problem description."""
    shape, target = tuple(shape), tuple(target)
    if shape == target:
        return ShapeFix()
    problem = (
        f"{name}: checkpoint shape {list(shape)} cannot be reconciled with target {list(target)}"
    )
    if len(shape) != len(target):
        return problem + " (different number of dims)"

    def is_vocab_dim(src: int, dst: int) -> bool:
        if padded_vocab is not None and vocab is not None:
            return src == padded_vocab and dst == vocab
        if vocab is not None and dst == vocab:
            return looks_padded_vocab(src) or src - dst < 128
        return False  # without a known vocab, a trim is judged as world-size padding

    diff = [d for d in range(len(shape)) if shape[d] != target[d]]
    if len(diff) == 1:
        d = diff[0]
        src, dst = shape[d], target[d]
        if dst < src:
            if is_vocab_dim(src, dst):
                return ShapeFix([O.narrow(d, 0, dst)], [_trim_action("vocab", d, shape, target)])
            if (
                padded_vocab and vocab and src % padded_vocab == 0 and dst % vocab == 0
                and src // padded_vocab == dst // vocab and src // padded_vocab > 1
            ):
                k = src // padded_vocab
                return ShapeFix(
                    [O.blocks(d, padded_vocab, vocab, k)],
                    [_trim_action("vocab-stacked", d, shape, target, tables=k)],
                )
            # a world size larger than half the padded length would mean "mostly padding": not plausible
            sizes = world_sizes_for(src, dst, limit=min(MAX_WORLD, max(2, src // 2)))
            if sizes:
                return ShapeFix(
                    [O.narrow(d, 0, dst)],
                    [_trim_action("world-size", d, shape, target, world_sizes=sizes[:8])],
                )
            return problem + f" (dim {d}: {src} -> {dst} is not vocab or world-size padding)"
        if dst > src:
            vocab_grow = vocab is not None and dst == vocab
            if not vocab_grow:
                return problem + f" (dim {d} would grow {src} -> {dst}; only a vocab dim may grow)"
            if not allow_grow:
                return problem + f" (dim {d} would grow {src} -> {dst}; pass --allow-grow to add rows)"
            if dst > MAX_GROW_FACTOR * src + MAX_GROW_SLACK:
                return problem + (f" (dim {d} would grow {src} -> {dst}: more than {MAX_GROW_FACTOR}x the checkpoint's "
                                  "rows is not a vocab that grew; check --vocab-size / the target)")
            return ShapeFix(
                [O.grow(d, dst, grow_init)],
                [{"action": "grow", "rule": "vocab", "dim": d, "from": list(shape), "to": list(target), "init": grow_init}],
            )
    if len(shape) == 2 and (shape[1], shape[0]) != shape:
        flipped = (shape[1], shape[0])
        fix = reconcile_shape(name, flipped, target, vocab=vocab, padded_vocab=padded_vocab,
                              allow_grow=allow_grow, grow_init=grow_init)
        if isinstance(fix, ShapeFix) and (flipped == target or fix.actions):
            return ShapeFix(
                [O.transpose(0, 1), *fix.ops],
                [{"action": "transpose", "rule": "stored-transposed", "from": list(shape), "to": list(flipped)},
                 *fix.actions],
            )
    return problem
