"""Optimizer rules: map integer state ids to parameter names and describe param groups.

Torch's ``optimizer.state_dict()`` keys state by position in the param groups. The names come
from, in this order: ``param_names`` recorded in the groups (torch records them when the
optimizer was built from ``named_parameters()``); a list the user passes with
``--param-names`` (applied only when every state's shape fits the parameter it names); group
order -- each param group follows the model's order, the groups in any order
(:func:`by_groups`, over the model's parameters filtered by ``--trainable``), taken only when
exactly one assignment fits the shapes. A mapping that is ambiguous or fails is reported, never
guessed.

State saved by a sharded optimizer that keeps only one rank's rows (modded-nanogpt's
``DistAdam`` keeps ``p[r*n/ws:(r+1)*n/ws]`` of each moment, and only rank 0 saves) is
recognised by shape: :func:`partial_rows` says which rows exist, and the shape match accepts
such slices when one world size explains every state.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shardfix.reconcile.group_order import classes_of, group_mappings


@dataclass(slots=True)
class IdMapping:
    """How one optimizer's integer ids map to parameter names."""

    names: dict[Any, str] = field(default_factory=dict)
    method: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True, slots=True)
class PartialRows:
    """A state that holds only rows ``0..rows-1`` of its parameter's ``of`` rows (dim 0)."""

    rows: int
    of: int
    world_size: int | None  # ``of / rows`` when it divides evenly

    def describe(self) -> str:
        why = (f"one rank's slice of a world-size-{self.world_size} sharded state" if self.world_size
               else "a dim-0 slice of a sharded state; the other rows are missing")
        return f"rows 0..{self.rows - 1} of {self.of} exist ({why})"


def partial_rows(state: tuple[int, ...], param: tuple[int, ...]) -> PartialRows | None:
    """Recognise a state that is a leading dim-0 slice of its parameter's shape, or None.

    The rows are assumed to be rank 0's (the rank that saves in the layouts docs/formats/core.md names):
    the shape alone cannot tell which rank's slice a file holds.
    """
    if len(state) != len(param) or not state or state[1:] != param[1:]:
        return None
    k, n = state[0], param[0]
    if not 0 < k < n:
        return None
    return PartialRows(k, n, n // k if n % k == 0 else None)



def names_per_optimizer(names: list[str] | list[list[str]], counts: list[int]) -> list[list[str]] | str:
    """Split ``--param-names`` into one list per optimizer, or say why it does not fit.

    Args:
        names: what ``shardfix.targets.rules_files.read_param_names`` returned.
        counts: how many parameters each optimizer's param groups list.
    """
    if names and isinstance(names[0], list):
        if len(names) != len(counts):
            return (f"--param-names holds {len(names)} lists but the checkpoint has {len(counts)} optimizers; "
                    "give one list per optimizer")
        return [list(x) for x in names]
    flat: list[str] = list(names)  # type: ignore[arg-type]
    if len(counts) == 1:
        return [flat]
    if len(flat) != sum(counts):
        return (f"--param-names lists {len(flat)} names but the {len(counts)} optimizers hold "
                f"{' + '.join(map(str, counts))} = {sum(counts)} parameters; list them one optimizer after the "
                "other, or give one list per optimizer")
    out, i = [], 0
    for c in counts:
        out.append(flat[i:i + c])
        i += c
    return out


Shape = tuple[int, ...]
#: Whether a state shape fits a parameter shape.
Fits = Callable[[Shape, Shape], bool]


def _exact(w: Shape, h: Shape) -> bool:
    return w == h


def _slice_of(ws: int) -> Fits:
    """Fits the parameter itself or its rows ``0..n/ws-1`` (one rank's slice)."""

    def fits(w: Shape, h: Shape) -> bool:
        return w == h or (len(w) == len(h) and len(w) > 0 and w[1:] == h[1:] and w[0] * ws == h[0])

    return fits


def _count_embeddings(
    want: list[Shape | None], have: list[Shape], limit: int = 2, fits: Fits = _exact,
) -> int:
    """How many order-preserving ways ``want`` fits into ``have`` (capped at ``limit``)."""
    n, m = len(want), len(have)
    # ways[j] = number of ways to place want[i:] into have[j:]
    ways = [1] * (m + 1)
    for i in range(n - 1, -1, -1):
        nxt = [0] * (m + 1)
        for j in range(m - 1, -1, -1):
            w = nxt[j + 1]
            wi = want[i]
            if wi is None or fits(wi, have[j]):
                w += ways[j + 1]
            nxt[j] = min(w, limit)
        ways = nxt
    return ways[0]


def _first_embedding(
    want: list[Shape | None], have: list[Shape], fits: Fits = _exact,
) -> list[int]:
    out, j = [], 0
    for w in want:
        while want and j < len(have) and not (w is None or fits(w, have[j])):
            j += 1
        out.append(j)
        j += 1
    return out


def map_ids(
    ids: list[Any],
    group_names: list[str | None],
    state_shapes: dict[Any, tuple[int, ...] | None],
    model_params: list[tuple[str, tuple[int, ...]]],
    *,
    param_names_file: list[str] | None,
    trainable: str | None,
    label: str,
    groups: list[list[Any]] | None = None,
    orders: list[list[tuple[str, Shape]]] | None = None,
    order_source: str = "the checkpoint's key order",
    group_classes: tuple[tuple[str, str], ...] = (),
) -> IdMapping:
    """Map one optimizer's ids (in param-group order) to parameter names.

    Args:
        ids: every id in the param groups, in group order.
        group_names: ``param_names`` recorded alongside each id, or None where absent.
        state_shapes: the shape of each id's parameter-shaped state (None: no such state).
        model_params: the model's (name, shape) in key order, names already normalised.
        param_names_file: names from ``--param-names``, in param-group order.
        trainable: the ``--trainable`` regex.
        label: how to name this optimizer in messages.
        groups: the ids of each param group (default: one group of ``ids``).
        orders: candidate model orders (default: ``model_params`` as it is); empty: the order is unknown.
        order_source: where the model's order comes from, for the ledger and messages.
        group_classes: a profile's declared grouping, ``(class, regex)``: a group holds one class.
    """
    if ids and all(n is not None for n in group_names):
        return IdMapping({i: str(n) for i, n in zip(ids, group_names, strict=True)}, "param_names recorded in the param groups")
    if param_names_file is not None:
        return _from_file(ids, param_names_file, state_shapes, model_params, label)
    orders = [model_params] if orders is None else orders
    if not orders:
        return IdMapping(problems=[f"{label}: its state is keyed by integer ids and the model's parameter order is "
                                   f"not known ({order_source}); pass --param-names FILE"])
    if len(orders) == 1 and (groups is None or len(groups) <= 1):
        return _one_order(ids, state_shapes, orders[0], trainable, label)
    return by_groups(ids, groups or [ids], state_shapes, orders, trainable=trainable, label=label,
                     order_source=order_source, group_classes=group_classes)


def _from_file(ids: list[Any], names: list[str], state_shapes: dict[Any, Shape | None],
               model_params: list[tuple[str, Shape]], label: str) -> IdMapping:
    """``--param-names``, applied only when every state's shape fits the parameter it names."""
    if len(names) != len(ids):
        return IdMapping(problems=[
            f"{label}: --param-names lists {len(names)} names but the optimizer has "
            f"{len(ids)} parameters; list exactly the optimized parameters in param-group order"
        ])
    shapes = dict(model_params)
    bad = [f"state {i} {list(w)} named {n} {list(shapes[n])}" for i, n in zip(ids, names, strict=True)
           if (w := state_shapes.get(i)) is not None and n in shapes and w != shapes[n]
           and partial_rows(w, shapes[n]) is None]
    if bad:
        return IdMapping(problems=[
            f"{label}: --param-names does not fit the state shapes ({'; '.join(bad[:4])}"
            f"{f'; and {len(bad) - 4} more' if len(bad) > 4 else ''}); the list must follow the optimizer's "
            "param-group order (group after group), not the model's -- fix --param-names FILE"
        ])
    return IdMapping(dict(zip(ids, names, strict=True)), "--param-names")


def _one_order(ids: list[Any], state_shapes: dict[Any, Shape | None], model_params: list[tuple[str, Shape]],
               trainable: str | None, label: str) -> IdMapping:
    """One param group in the model's order: an order-preserving shape match, taken when unique."""
    candidates = model_params
    if trainable:
        rx = re.compile(trainable)
        candidates = [(n, s) for n, s in model_params if rx.search(n)]
    want = [state_shapes.get(i) for i in ids]
    have = [s for _, s in candidates]
    among = f" matching --trainable {trainable!r}" if trainable else ""
    flag = "--trainable REGEX" if not trainable else "a narrower --trainable"
    if not any(w is not None for w in want):
        return IdMapping(problems=[f"{label}: no parameter-shaped state to match by shape; pass --param-names FILE"])
    if len(want) == len(have):
        bad = [(i, n, w, s) for i, (w, (n, s)) in enumerate(zip(want, candidates, strict=True)) if w is not None and w != s]
        if not bad:
            return IdMapping({i: n for i, (n, _) in zip(ids, candidates, strict=True)},
                             f"shape match in order against {len(have)} model parameters{among}")
    attempts: list[tuple[Fits, str]] = [(_exact, "")]
    attempts += [(_slice_of(ws), f" of 1/{ws} row slices (a world-size-{ws} sharded state)")
                 for ws in _world_sizes(want, have)]
    for fits, how in attempts:
        ways = _count_embeddings(want, have, fits=fits)
        if ways == 1:
            pos = _first_embedding(want, have, fits)
            return IdMapping({i: candidates[p][0] for i, p in zip(ids, pos, strict=True)},
                             f"unique order-preserving shape match{how} ({len(ids)} of {len(have)} parameters{among}; "
                             "a param group follows the model's order)")
        if ways > 1:
            return IdMapping(problems=[
                f"{label}: {len(ids)} optimized parameters match the model's {len(have)} candidate "
                f"parameters{among} by shape in more than one way (ambiguous: "
                f"{_ambiguous(ids, want, candidates, fits)}); pass {flag} (e.g. --trainable lora_) "
                "or --param-names FILE"
            ])
    if len(want) == len(have):
        i, n, w, s = bad[0]
        return IdMapping(problems=[
            f"{label}: state {ids[i]} has shape {list(w)} but the {i}th candidate parameter {n} has "
            f"{list(s)}; the optimizer's order is not the model's -- pass --param-names FILE"
        ])
    return IdMapping(problems=[
        f"{label}: the {len(ids)} optimized parameters' shapes do not fit the model's "
        f"{len(have)} parameters{among} in order; pass --param-names FILE"
        + ("" if trainable else " (or --trainable REGEX when only some parameters were trained)")
    ])


def _world_sizes(want: list[Shape | None], have: list[Shape], limit: int = 3) -> list[int]:
    """World sizes that would explain state shapes as 1/ws row slices, most frequent first."""
    counts: dict[int, int] = {}
    for w in set(x for x in want if x):
        for h in set(have):
            if len(w) == len(h) and w[1:] == h[1:] and w[0] and h[0] > w[0] and h[0] % w[0] == 0:
                counts[h[0] // w[0]] = counts.get(h[0] // w[0], 0) + 1
    return sorted(counts, key=lambda ws: (-counts[ws], ws))[:limit]


def _ambiguous(ids: list[Any], want: list[Shape | None], candidates: list[tuple[str, Shape]], fits: Fits) -> str:
    """Name the states that fit more than one parameter in some order-preserving match."""
    n, m = len(want), len(candidates)
    have = [s for _, s in candidates]
    ok = [w is None or fits(w, h) for w in want for h in have]
    # pre[i][j]: want[:i] fits into have[:j]; suf[i][j]: want[i:] fits into have[j:]
    pre = [[True] * (m + 1)] + [[False] * (m + 1) for _ in range(n)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            pre[i][j] = pre[i][j - 1] or (pre[i - 1][j - 1] and ok[(i - 1) * m + j - 1])
    suf = [[False] * (m + 1) for _ in range(n)] + [[True] * (m + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            suf[i][j] = suf[i][j + 1] or (suf[i + 1][j + 1] and ok[i * m + j])
    parts = []
    for i in range(n):
        where = [candidates[j][0] for j in range(m) if ok[i * m + j] and pre[i][j] and suf[i + 1][j + 1]]
        if len(where) > 1:
            wi = want[i]
            shape = list(wi) if wi is not None else "no state"
            parts.append(f"state {ids[i]} {shape} could be " + " or ".join(where[:3]) + (" or ..." if len(where) > 3 else ""))
    shown = "; ".join(parts[:4])
    return shown + (f"; and {len(parts) - 4} more" if len(parts) > 4 else "")


def by_groups(
    ids: list[Any],
    groups: list[list[Any]],
    state_shapes: dict[Any, Shape | None],
    orders: list[list[tuple[str, Shape]]],
    *,
    trainable: str | None,
    label: str,
    order_source: str,
    group_classes: tuple[tuple[str, str], ...] = (),
) -> IdMapping:
    """Each param group in the model's order, the groups in any order: taken when exactly one assignment fits.

    Every candidate model order is tried (one when the order is known); a profile's declared
    grouping (``group_classes``) is tried first and dropped when nothing fits it.
    """
    rx = re.compile(trainable) if trainable else None
    cands = [[(n, s) for n, s in o if rx is None or rx.search(n)] for o in orders]
    want = [state_shapes.get(i) for i in ids]
    among = f" matching --trainable {trainable!r}" if trainable else ""
    if not any(w is not None for w in want):
        return IdMapping(problems=[f"{label}: no parameter-shaped state to match by shape; pass --param-names FILE"])
    have = [s for _, s in cands[0]]
    attempts: list[tuple[Fits, str]] = [(_exact, "")]
    attempts += [(_slice_of(ws), f" of 1/{ws} row slices (a world-size-{ws} sharded state)")
                 for ws in _world_sizes(want, have)]
    for fits, how in attempts:
        found: dict[frozenset[tuple[Any, str]], dict[Any, str]] = {}
        exhausted, declared = False, False
        for declared in ((True, False) if group_classes else (False,)):
            for order in cands:
                classes = classes_of([n for n, _ in order], group_classes) if declared else None
                res = group_mappings(groups, state_shapes, order, fits, classes)
                exhausted = exhausted or res.exhausted
                for mp in res.mappings:
                    found.setdefault(frozenset(mp.items()), mp)
                if len(found) > 1:
                    break
            if found:
                break
        if len(found) == 1 and not exhausted:
            rule = (f"group order: each of {len(groups)} param groups follows the model's order, the groups in any "
                    f"order; the only assignment the shapes{how} allow ({len(ids)} of {len(have)} parameters{among}; "
                    f"model order: {order_source}{'; the profile declares the grouping' if declared else ''})")
            return IdMapping(next(iter(found.values())), rule)
        if len(found) > 1:
            a, b = list(found.values())[:2]
            diff = [f"state {i} {list(s) if (s := state_shapes.get(i)) else 'no state'} could be {a[i]} or {b[i]}"
                    for i in ids if a[i] != b[i]]
            return IdMapping(problems=[
                f"{label}: its {len(groups)} param groups fit the model's parameters{among} in more than one way even "
                f"with each group in model order (ambiguous: {'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}); "
                "pass --param-names FILE" + ("" if trainable else " or --trainable REGEX")
            ])
        if exhausted:
            return IdMapping(problems=[f"{label}: too many ways to place its {len(ids)} parameters by group order to "
                                       "check that one is unique; pass --param-names FILE"])
    return IdMapping(problems=[
        f"{label}: its {len(groups)} param groups do not fit the model's {len(have)} parameters{among} with each group "
        f"in model order (model order: {order_source}); pass --param-names FILE"
        + ("" if trainable else " (or --trainable REGEX when only some parameters were trained)")
    ])
