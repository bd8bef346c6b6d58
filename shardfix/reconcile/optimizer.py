"""Optimizer rules: map integer state ids to parameter names and describe param groups.

Torch's ``optimizer.state_dict()`` keys state by position in the param groups. The names come
from, in this order: ``param_names`` recorded in the groups (torch records them when the
optimizer was built from ``named_parameters()``); a list the user passes with
``--param-names``; an order-preserving match of state shapes against the model's parameters
filtered by ``--trainable``. A mapping that is ambiguous or fails is reported, never guessed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardfix.errors import BadInputError


@dataclass(slots=True)
class IdMapping:
    """How one optimizer's integer ids map to parameter names."""

    names: dict[Any, str] = field(default_factory=dict)
    method: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def read_param_names(path: str) -> list[str]:
    """Read ``--param-names``: a JSON list, a JSON ``{"param_names": [...]}``, or one name per line."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise BadInputError(f"--param-names: cannot read {p} ({e.strerror})") from e
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        try:
            data = json.loads(stripped)
        except ValueError as e:
            raise BadInputError(f"--param-names: {p} is not valid JSON ({e})") from e
        if isinstance(data, dict):
            data = data.get("param_names", data.get("names"))
        if not isinstance(data, list) or not all(isinstance(n, str) for n in data):
            raise BadInputError(f"--param-names: {p} must hold a JSON list of parameter names")
        return data
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def _count_embeddings(want: list[tuple[int, ...] | None], have: list[tuple[int, ...]], limit: int = 2) -> int:
    """How many order-preserving ways ``want`` fits into ``have`` (capped at ``limit``)."""
    n, m = len(want), len(have)
    # ways[j] = number of ways to place want[i:] into have[j:]
    ways = [1] * (m + 1)
    for i in range(n - 1, -1, -1):
        nxt = [0] * (m + 1)
        for j in range(m - 1, -1, -1):
            w = nxt[j + 1]
            if want[i] is None or want[i] == have[j]:
                w += ways[j + 1]
            nxt[j] = min(w, limit)
        ways = nxt
    return ways[0]


def _first_embedding(want: list[tuple[int, ...] | None], have: list[tuple[int, ...]]) -> list[int]:
    out, j = [], 0
    for w in want:
        while want and j < len(have) and not (w is None or w == have[j]):
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
    """
    if ids and all(n is not None for n in group_names):
        return IdMapping(dict(zip(ids, group_names, strict=True)), "param_names recorded in the param groups")
    if param_names_file is not None:
        if len(param_names_file) != len(ids):
            return IdMapping(problems=[
                f"{label}: --param-names lists {len(param_names_file)} names but the optimizer has "
                f"{len(ids)} parameters; list exactly the optimized parameters in param-group order"
            ])
        return IdMapping(dict(zip(ids, param_names_file, strict=True)), "--param-names")
    candidates = model_params
    if trainable:
        rx = re.compile(trainable)
        candidates = [(n, s) for n, s in model_params if rx.search(n)]
    want = [state_shapes.get(i) for i in ids]
    have = [s for _, s in candidates]
    flag = "--trainable REGEX" if not trainable else "a narrower --trainable"
    if not any(w is not None for w in want):
        return IdMapping(problems=[f"{label}: no parameter-shaped state to match by shape; pass --param-names FILE"])
    if len(want) == len(have):
        bad = [(i, n, w, s) for i, (w, (n, s)) in enumerate(zip(want, candidates, strict=True)) if w is not None and w != s]
        if not bad:
            return IdMapping({i: n for i, (n, _) in zip(ids, candidates, strict=True)},
                             f"shape match in order against {len(have)} model parameters"
                             + (f" matching --trainable {trainable!r}" if trainable else ""))
        i, n, w, s = bad[0]
        return IdMapping(problems=[
            f"{label}: state {ids[i]} has shape {list(w)} but the {i}th candidate parameter {n} has "
            f"{list(s)}; the optimizer's order is not the model's -- pass --param-names FILE"
        ])
    ways = _count_embeddings(want, have)
    if ways == 1:
        pos = _first_embedding(want, have)
        return IdMapping({i: candidates[p][0] for i, p in zip(ids, pos, strict=True)},
                         f"unique order-preserving shape match ({len(ids)} of {len(have)} parameters)")
    if ways == 0:
        return IdMapping(problems=[
            f"{label}: the {len(ids)} optimized parameters' shapes do not fit the model's "
            f"{len(have)} parameters in order; pass --param-names FILE"
        ])
    return IdMapping(problems=[
        f"{label}: {len(ids)} optimized parameters match the model's {len(have)} candidate "
        f"parameters by shape in more than one way (ambiguous); pass {flag} (e.g. --trainable lora_) "
        "or --param-names FILE"
    ])
