"""Planner stage for ``--companions``: side tensors keyed by parameter name (masks, EMA copies)
receive exactly their parameter's cuts and go to their own set, or are skipped by name."""

from __future__ import annotations

from typing import Any

from shardfix.plan.context import PlanContext
from shardfix.plan.types import COMPANIONS, LedgerEntry, OutputTensor, fate_of
from shardfix.reconcile import ops as O
from shardfix.reconcile.keys import classify, is_flat_model, strip_wrappers
from shardfix.sources.base import SourceIndex, TensorEntry


def _misfit(ctx: PlanContext, e: TensorEntry, name: str) -> str | None:
    pt = ctx.model.get(name)
    if pt is None:
        return f"no parameter named {name!r} in the checkpoint"
    if pt.dropped:
        return f"its parameter {name} was dropped"
    if tuple(e.shape) != pt.entry.shape:
        return f"shape {list(e.shape)} does not match its parameter {name} {list(pt.entry.shape)} (made for another model?)"
    return None


def plan_companions(comp: SourceIndex, ctx: PlanContext) -> tuple[list[OutputTensor], list[LedgerEntry]]:
    """Side tensors follow their parameter's cuts; those that do not fit are skipped and named in a warning."""
    out: list[OutputTensor] = []
    ledger: list[LedgerEntry] = []
    skipped: list[str] = []
    flat = is_flat_model([e.path for e in comp.entries], [e.path for e in comp.tensors()])
    for e in comp.entries:
        if not isinstance(e, TensorEntry):
            ledger.append(LedgerEntry(e.key, "dropped", kind="object", origin=COMPANIONS,
                                      reason=f"non-tensor entry ({e.type_name})"))
            continue
        role = classify(e.path, flat)
        name, _ = strip_wrappers(role.name if role.kind == "model" else ".".join(str(p) for p in e.path[1:] or e.path))
        actions: list[dict[str, Any]] = []
        if e.layout != "strided":
            actions.append({"action": "densify", "rule": f"{e.layout} tensor written dense"})
        reason = _misfit(ctx, e, name)
        if reason:
            skipped.append(e.key)
            ledger.append(LedgerEntry(e.key, "dropped", actions=actions, reason=reason, dtype=e.dtype,
                                      shape=list(e.shape), origin=COMPANIONS))
            continue
        names = []
        changed = False
        for part_name, ops_, part_actions in ctx.model[name].outputs():
            out.append(OutputTensor(part_name, e.key, e.dtype, list(O.out_shape(e.shape, ops_)), ops_, COMPANIONS))
            names.append(part_name)
            changed = changed or bool(ops_)
            actions += [{**a, "rule": a.get("rule", "") + " (follows its parameter)"} for a in part_actions]
        ledger.append(LedgerEntry(e.key, fate_of(len(names), changed), names, actions, dtype=e.dtype, shape=list(e.shape),
                                  origin=COMPANIONS))
    if skipped:
        ctx.warnings.append(f"--companions: skipped {len(skipped)} side tensor(s) that do not fit the checkpoint: "
                            + ", ".join(skipped[:20]) + (" ..." if len(skipped) > 20 else ""))
    return out, ledger
