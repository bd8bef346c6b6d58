"""Naming integer optimizer ids by param-group order: each group follows the model's order.

Torch numbers an optimizer's parameters group after group. Training scripts build the groups by
filtering ``model.named_parameters()`` (the transformers Trainer: weight-decay parameters, then
no-decay ones; modded-nanogpt: head, embeddings, scalars), so *within* a group the parameters
follow the model's order while the groups themselves may come in any order. The rule here
finds every assignment of ids to distinct model parameters that satisfies that and the state
shapes, and is taken only when there is exactly one.

When the model's order itself is unknown (safetensors stores tensors sorted by name), a caller
gives several candidate orders (:func:`tree_orders`, or one order from a profile's declared
module order, :func:`declared_sort`); the mapping is taken only when every candidate order that
admits a mapping gives the same one.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

Shape = tuple[int, ...]
Fits = Callable[[Shape, Shape], bool]


class _Budget(Exception):
    """The search took more steps than allowed."""


@dataclass(slots=True)
class GroupSearch:
    """Distinct mappings found (at most ``limit``) and whether the search ran out of steps."""

    mappings: list[dict[Any, str]] = field(default_factory=list)
    exhausted: bool = False


def classes_of(names: list[str], patterns: tuple[tuple[str, str], ...]) -> list[str]:
    """Each name's declared class: the first ``(class, regex)`` whose regex it matches, else ``""``."""
    compiled = [(c, re.compile(rx)) for c, rx in patterns]
    return [next((c for c, rx in compiled if rx.search(n)), "") for n in names]


def group_mappings(
    groups: list[list[Any]],
    want: dict[Any, Shape | None],
    model: list[tuple[str, Shape]],
    fits: Fits,
    classes: list[str] | None = None,
    limit: int = 2,
    budget: int = 200_000,
) -> GroupSearch:
    """Assignments of every id to a distinct model parameter, each group in model order.

    Args:
        groups: the ids of each param group, in group order.
        want: each id's parameter-shaped state shape (None: no such state; fits any parameter).
        model: the candidate parameters (name, shape) in the model's order.
        fits: whether a state shape fits a parameter shape.
        classes: each model parameter's declared class; when given, a group's parameters share one.
        limit: stop after this many distinct assignments.
        budget: search steps allowed before giving up (``exhausted``).
    """
    m = len(model)
    used = [False] * m
    assign: dict[Any, int] = {}
    out = GroupSearch()
    order = sorted(range(len(groups)), key=lambda g: -len(groups[g]))
    steps = [0]

    def ok(i: Any, p: int) -> bool:
        w = want.get(i)
        return w is None or fits(w, model[p][1])

    def suffix(ids: list[Any]) -> list[list[bool]]:
        # suf[k][p]: ids[k:] fit, in order, into unused positions p..m-1
        suf = [[False] * (m + 1) for _ in ids] + [[True] * (m + 1)]
        for k in range(len(ids) - 1, -1, -1):
            for p in range(m - 1, -1, -1):
                suf[k][p] = suf[k][p + 1] or (not used[p] and ok(ids[k], p) and suf[k + 1][p + 1])
        return suf

    def place(oi: int) -> bool:
        if oi == len(order):
            out.mappings.append({i: model[p][0] for i, p in assign.items()})
            return len(out.mappings) >= limit
        ids = groups[order[oi]]
        return embed(oi, ids, 0, 0, suffix(ids), None)

    def embed(oi: int, ids: list[Any], k: int, j: int, suf: list[list[bool]], cls: str | None) -> bool:
        if k == len(ids):
            return place(oi + 1)
        for p in range(j, m):
            if not suf[k][p]:
                break
            steps[0] += 1
            if steps[0] > budget:
                raise _Budget
            if used[p] or not ok(ids[k], p) or not suf[k + 1][p + 1]:
                continue
            c = classes[p] if classes is not None else None
            if cls is not None and c != cls:
                continue
            used[p] = True
            assign[ids[k]] = p
            done = embed(oi, ids, k + 1, p + 1, suf, c)
            used[p] = False
            del assign[ids[k]]
            if done:
                return True
        return False

    try:
        place(0)
    except _Budget:
        out.exhausted = True
    return out


def declared_sort(names: list[str], templates: tuple[str, ...]) -> list[str] | None:
    """``names`` in the order a declared module order gives, or None when one of them is not declared.

    ``templates`` list parameter names in declaration order, ``{i}`` standing for a layer index
    (``model.layers.{i}.self_attn.q_proj.weight``); templates before the first ``{i}`` one come
    first, then every layer in index order with its templates in order, then the rest.
    """
    rx = [re.compile("^" + re.escape(t).replace(r"\{i\}", r"(\d+)") + "$") for t in templates]
    layered = [("{i}" in t) for t in templates]
    first = layered.index(True) if any(layered) else len(templates)
    keys: dict[str, tuple[int, ...]] = {}
    for n in names:
        for k, r in enumerate(rx):
            mt = r.match(n)
            if mt is None:
                continue
            if layered[k]:
                keys[n] = (1, int(mt.group(1)), k)
            else:
                keys[n] = (0 if k < first else 2, k)
            break
        else:
            return None
    return sorted(names, key=lambda n: keys[n])


@dataclass(slots=True)
class _Node:
    params: list[str] = field(default_factory=list)
    children: dict[str, _Node] = field(default_factory=dict)


def _tree(names: list[str]) -> _Node | None:
    root = _Node()
    for n in names:
        *mods, leaf = n.split(".")
        node = root
        for part in mods:
            if part in node.params:
                return None
            node = node.children.setdefault(part, _Node())
        if leaf in node.children:
            return None
        node.params.append(leaf)
    return root


def _param_orders(params: list[str]) -> list[tuple[str, ...]]:
    """A module's own parameters: every order with ``weight`` before ``bias`` (torch's layers register them so)."""
    out = []
    for perm in itertools.permutations(sorted(params)):
        if "weight" in perm and "bias" in perm and perm.index("bias") < perm.index("weight"):
            continue
        out.append(perm)
    return out


def _child_orders(children: dict[str, _Node]) -> list[tuple[str, ...]]:
    """Submodules: a ModuleList's (all-digit names) in index order, others in every order."""
    keys = list(children)
    if keys and all(k.isdigit() for k in keys):
        return [tuple(sorted(keys, key=int))]
    return list(itertools.permutations(sorted(keys)))


def _count(node: _Node, cap: int) -> int:
    n = len(_param_orders(node.params)) * len(_child_orders(node.children)) if len(node.params) < 7 and len(
        node.children) < 8 else cap + 1
    for c in node.children.values():
        n *= _count(c, cap)
        if n > cap:
            return cap + 1
    return n


def _orders(node: _Node, prefix: str) -> Iterator[list[str]]:
    for params in _param_orders(node.params):
        own = [prefix + p for p in params]
        for kids in _child_orders(node.children):
            subs = [list(_orders(node.children[k], f"{prefix}{k}.")) for k in kids]
            for combo in itertools.product(*subs):
                yield own + [n for part in combo for n in part]


def tree_orders(names: list[str], cap: int = 720) -> list[list[str]] | None:
    """Every parameter order a module tree with these names can have, or None when more than ``cap``.

    ``named_parameters()`` lists a module's own parameters, then each submodule's in turn, so the
    order is a walk of the module tree; what names alone cannot tell is the order of a module's
    submodules (except a ModuleList's, by index) and of its own parameters (``weight`` is taken
    to come before ``bias``).
    """
    root = _tree(names)
    if root is None or _count(root, cap) > cap:
        return None
    return list(_orders(root, ""))
