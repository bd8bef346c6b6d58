"""Plan optimizer state: name every state tensor, cut it like its parameter, describe the groups.

State keyed by FQN (DCP ``get_state_dict``) maps by name; state keyed by integer position maps
through :func:`shardfix.reconcile.optimizer.map_ids`. A parameter's state is written whole or
not at all; partial (one rank's) slices are dropped with the rows that exist, or written under
explicit names with ``--partial-optimizer``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from shardfix.options import ConvertOptions
from shardfix.outputs.hf import PARAM_GROUPS_NAME
from shardfix.plan.context import PlanContext
from shardfix.plan.model_order import ModelOrder, model_order
from shardfix.plan.types import PARTIAL_ROWS_KEY, LedgerEntry, ModelTensor, OutputFile, OutputTensor, fate_of
from shardfix.reconcile import ops as O
from shardfix.reconcile.keys import strip_wrappers
from shardfix.reconcile.optimizer import (
    IdMapping,
    PartialRows,
    map_ids,
    names_per_optimizer,
    partial_rows,
)
from shardfix.sources.base import ObjectEntry, TensorEntry
from shardfix.targets.rules_files import read_param_names


@dataclass(slots=True)
class OptimizerPlan:
    """What optimizer planning produced: tensors to write, param groups (None: no optimizer), partial slices."""

    out: list[OutputTensor] = field(default_factory=list)
    param_groups: list[dict[str, Any]] | None = None
    #: for ``--partial-optimizer``, the row range of each partial slice written, by output name
    partial: dict[str, dict[str, Any]] = field(default_factory=dict)


_States = dict[int, dict[Any, dict[str, TensorEntry | ObjectEntry]]]
_Groups = dict[int, dict[int, dict[str, Any]]]


def _collect(ctx: PlanContext) -> tuple[_States, _Groups]:
    """Optimizer state by (optimizer, parameter ref, state name) and param-group values by (optimizer, group)."""
    states: _States = defaultdict(lambda: defaultdict(dict))
    groups: _Groups = defaultdict(lambda: defaultdict(dict))
    for e in ctx.index.entries:
        role = ctx.roles[e.key]
        if role.kind == "optim_state":
            states[role.optimizer][role.param][role.state] = e
        elif role.kind == "param_group" and role.group is not None:
            if isinstance(e, TensorEntry):
                ctx.record(LedgerEntry(
                    e.key, "dropped", dtype=e.dtype, shape=list(e.shape),
                    reason=f"tensor {role.hparam!r} stored inside param group {role.group} (an optimizer buffer or "
                    "tensor hyperparameter, not per-parameter state); not written",
                ))
                ctx.warnings.append(f"{e.key}: a tensor inside a param group; dropped (not per-parameter state)")
                continue
            groups[role.optimizer][role.group][role.hparam] = (e.key, e.value)
    return states, groups


def _drop_everything(ctx: PlanContext, reason: str) -> None:
    for e in ctx.index.entries:
        if ctx.roles[e.key].kind in ("optim_state", "param_group") and e.key not in ctx.ledger:
            ctx.record(LedgerEntry(e.key, "dropped", kind="tensor" if isinstance(e, TensorEntry) else "object",
                                   reason=reason))


def _names_file(ctx: PlanContext, optimizers: list[int], refs: dict[int, list[tuple[Any, Any]]]) -> list[list[str]] | None:
    """``--param-names`` split per optimizer (wrappers stripped), or None."""
    if not ctx.opts.param_names:
        return None
    split = names_per_optimizer(read_param_names(ctx.opts.param_names),
                                [sum(1 for _, n in refs[o] if n is not _STATE_ONLY) for o in optimizers])
    if isinstance(split, str):
        ctx.problems.append(split)
        return None
    return [[strip_wrappers(n)[0] for n in names] for names in split]


def _mapping(ctx: PlanContext, st: dict[Any, dict[str, TensorEntry | ObjectEntry]], refs: list[tuple[Any, Any]],
             names_file: list[str] | None, label: str, gdict: dict[int, dict[str, Any]], order: ModelOrder) -> IdMapping:
    """How one optimizer's state refs map to model parameter names."""
    ids = [ref for ref, _ in refs]
    if all(isinstance(i, str) for i in ids):
        return IdMapping({i: strip_wrappers(i)[0] for i in ids}, "parameter names (FQN-keyed state)")
    gnames = [None if n is _STATE_ONLY else n for _, n in refs]
    shapes = {ref: next((tuple(s.shape) for s in st[ref].values() if isinstance(s, TensorEntry) and len(s.shape) > 0), None)
              for ref in st}
    model_params = [(n, t.entry.shape) for n, t in ctx.model.items()]
    return map_ids(ids, [strip_wrappers(n)[0] if n else None for n in gnames], shapes, model_params,
                   param_names_file=names_file, trainable=ctx.opts.trainable, label=label,
                   groups=_group_ids(gdict, refs), orders=order.orders, order_source=order.source,
                   group_classes=order.group_classes)


def _group_ids(gdict: dict[int, dict[str, Any]], refs: list[tuple[Any, Any]]) -> list[list[Any]]:
    """The ids of each param group (non-empty ones), then each id listed in no group on its own."""
    out = [list(ps) for g in sorted(gdict) if (ps := gdict[g].get("params", (None, []))[1] or [])]
    return out + [[ref] for ref, n in refs if n is _STATE_ONLY]


def _refuse(ctx: PlanContext, mapping: IdMapping, st: dict[Any, dict[str, Any]], gdict: dict[int, dict[str, Any]],
            label: str) -> None:
    """An optimizer whose ids cannot be named: none of its state is written, loudly."""
    for msg in mapping.problems:
        ctx.warnings.append(msg + f"; the model is converted, no optimizer state is written for {label}")
    for sd in st.values():
        for e in sd.values():
            ctx.record(LedgerEntry(e.key, "dropped", reason=mapping.problems[0],
                                   kind="tensor" if isinstance(e, TensorEntry) else "object"))
    for g in gdict.values():
        for key, _ in g.values():
            ctx.record(LedgerEntry(key, "dropped", kind="object", reason=mapping.problems[0]))


def _warn_partial(ctx: PlanContext, found: list[tuple[str, str]], label: str) -> None:
    if not found:
        return
    shown = "; ".join(f"{key}: {what}" for key, what in found[:3])
    more = f"; and {len(found) - 3} more" if len(found) > 3 else ""
    what = (f"written under explicit .rows_A_B names with the row range in the {PARTIAL_ROWS_KEY!r} "
            "metadata (--partial-optimizer)" if ctx.opts.partial_optimizer else
            "dropped (pass --partial-optimizer to write the slices under explicit names)")
    ctx.warnings.append(f"{label}: {len(found)} state tensors hold only part of their parameter's rows -- the "
                        f"saved state is incomplete and is not written as the full state ({shown}{more}); {what}")


def _record_groups(ctx: PlanContext, opt: int, gdict: dict[int, dict[str, Any]], mapping: IdMapping) -> list[dict[str, Any]]:
    out = []
    for g in sorted(gdict):
        group: dict[str, Any] = {"optimizer": opt, "group": g}
        for fname, (key, value) in gdict[g].items():
            ctx.record(LedgerEntry(key, "recorded", [PARAM_GROUPS_NAME], kind="object"))
            if fname not in ("params", "param_names"):
                group[fname] = value if _jsonable(value) else repr(value)
        params = gdict[g].get("params", (None, []))[1] or []
        group["params"] = [mapping.names.get(p, str(p)) for p in params]
        out.append(group)
    return out


def plan_optimizer(ctx: PlanContext) -> OptimizerPlan:
    """Plan optimizer state: name it, cut it like its parameter, describe the param groups."""
    states, groups = _collect(ctx)
    if not states and not groups:
        return OptimizerPlan()
    if ctx.opts.no_optimizer:
        _drop_everything(ctx, "--no-optimizer")
        return OptimizerPlan()
    optimizers = sorted(set(states) | set(groups))
    refs = {opt: _optimizer_ids(groups.get(opt, {}), states.get(opt, {})) for opt in optimizers}
    names_file = _names_file(ctx, optimizers, refs)
    plan = _OptimPlan(ctx.model, ctx.opts, ctx.ledger, ctx.warnings)
    order = model_order(ctx)
    param_groups: list[dict[str, Any]] = []
    for k, opt in enumerate(optimizers):
        label = f"optimizer {opt}" if len(optimizers) > 1 else "the optimizer"
        gdict, st = groups.get(opt, {}), states.get(opt, {})
        mapping = _mapping(ctx, st, refs[opt], _names_for(names_file, k, refs[opt]), label, gdict, order)
        if not mapping.ok:
            _refuse(ctx, mapping, st, gdict, label)
            continue
        partial_before = len(plan.partial_seen)
        for ref, sd in st.items():
            plan.param(sd, ref, mapping.names[ref], mapping.method)
        _warn_partial(ctx, plan.partial_seen[partial_before:], label)
        param_groups += _record_groups(ctx, opt, gdict, mapping)
    return OptimizerPlan(plan.out, param_groups, plan.partial)


#: Marks an id that has state but is listed in no param group.
_STATE_ONLY: Any = object()


def _optimizer_ids(gdict: dict[int, dict[str, Any]], st: dict[Any, Any]) -> list[tuple[Any, Any]]:
    """Every id of one optimizer in param-group order, with its recorded name (None if absent).

    Ids that have state but appear in no group follow, marked :data:`_STATE_ONLY`.
    """
    out: list[tuple[Any, Any]] = []
    for g in sorted(gdict):
        params = gdict[g].get("params", (None, []))[1] or []
        recorded = gdict[g].get("param_names", (None, None))[1]
        names = recorded if isinstance(recorded, list) and len(recorded) == len(params) else [None] * len(params)
        out += list(zip(params, names, strict=True))
    listed = {ref for ref, _ in out}
    out += [(ref, _STATE_ONLY) for ref in st if ref not in listed]
    return out


def _names_for(names_file: list[list[str]] | None, k: int, refs: list[tuple[Any, Any]]) -> list[str] | None:
    """The ``--param-names`` of optimizer ``k``, plus a placeholder (no model name) per id outside the groups."""
    if names_file is None:
        return None
    names = names_file[k]
    extra = sum(1 for _, n in refs if n is _STATE_ONLY)
    return names if not extra else [*names, *[f"<id {ref}>" for ref, n in refs if n is _STATE_ONLY]]


@dataclass(slots=True)
class _OptimPlan:
    """Outputs and ledger entries for optimizer state, one parameter's state at a time."""

    model: dict[str, ModelTensor]
    opts: ConvertOptions
    ledger: dict[str, LedgerEntry]
    warnings: list[str]
    out: list[OutputTensor] = field(default_factory=list)
    partial: dict[str, dict[str, Any]] = field(default_factory=dict)
    partial_seen: list[tuple[str, str]] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)

    def param(self, sd: dict[str, TensorEntry | ObjectEntry], ref: Any, pname: str, method: str) -> None:
        """Plan every state of one parameter: all of it is written, or none of it as the full state."""
        pt = self.model.get(pname)
        if pt is None or pt.dropped:
            why = f"its parameter {pname} was dropped" if pt else f"state of {pname!r}, which is not a tensor of the model"
            for e in sd.values():
                self._drop(e, why)
            return
        odd: dict[str, str] = {}  # state name -> why it is not the parameter's shape
        rows: dict[str, PartialRows] = {}
        for sname, e in sd.items():
            if isinstance(e, TensorEntry) and not _scalar_state(e, sname) and tuple(e.shape) != pt.entry.shape:
                r = partial_rows(tuple(e.shape), pt.entry.shape)
                if r is None:
                    odd[sname] = (f"shape {list(e.shape)} does not match its parameter {pname} "
                                  f"{list(pt.entry.shape)}: a differently shaped state")
                else:
                    rows[sname] = r
                    self.partial_seen.append((e.key, r.describe()))
        if not odd and not rows:
            for sname, e in sd.items():
                self._write(e, ref, pname, sname, method, pt)
            return
        cut = None
        tensors = [n for n, e in sd.items() if isinstance(e, TensorEntry) and not _scalar_state(e, n)]
        if self.opts.partial_optimizer and not odd and len(tensors) == len(rows) and len(set(rows.values())) == 1:
            cut = _partial_ops(pt, next(iter(rows.values())))
        if cut is not None:
            for sname, e in sd.items():
                self._write(e, ref, pname, sname, method, pt, cut=cut, rows=rows.get(sname))
            return
        first = next(iter(odd.values())) if odd else f"incomplete: {next(iter(rows.values())).describe()}"
        if odd:
            self.warnings.append(f"{pname}: optimizer state {first}; none of its state is written")
        for sname, e in sd.items():
            if sname in odd:
                reason = odd[sname] + "; not written"
            elif sname in rows:
                hint = ("--partial-optimizer writes it under an explicit name" if not self.opts.partial_optimizer
                        else "its parameter is reshaped or split, or its states disagree, so the slice cannot follow it")
                reason = f"incomplete: {rows[sname].describe()}; not written as the full state ({hint})"
            else:
                reason = f"the rest of {pname}'s state is not written ({first}), so this part is not written either"
            self._drop(e, reason)

    def _write(self, e: TensorEntry | ObjectEntry, ref: Any, pname: str, sname: str, method: str, pt: ModelTensor,
               cut: tuple[list[dict[str, Any]], int, int, PartialRows] | None = None,
               rows: PartialRows | None = None) -> None:
        """Write one state: cut like its parameter, or (``cut``) as a named partial slice."""
        suffix = f".rows_0_{cut[1]}" if cut else ""
        out_name = f"state.{pname}.{sname}{suffix}"
        actions: list[dict[str, Any]] = []
        if str(ref) != pname or suffix:
            actions.append({"action": "rename", "from": e.key, "to": out_name, "rule": f"id {ref} -> {pname} ({method})"})
        if cut:
            ops_, kept, of, whole = cut
            what = rows.describe() if rows else f"scalar state of a parameter whose moments are partial ({whole.describe()})"
            actions.append({"action": "partial", "rule": f"--partial-optimizer: {what}", "rows": [0, kept], "of": of})
            self.partial[out_name] = {"parameter": pname, "state": sname, "rows": [0, kept], "of": of,
                                      "world_size": whole.world_size, "source": e.key}
        if isinstance(e, ObjectEntry):
            if isinstance(e.value, (int, float)) and not isinstance(e.value, bool):
                dt = "F32" if isinstance(e.value, float) or sname == "step" else "I64"
                if self._claim(e, out_name):
                    self.out.append(OutputTensor(out_name, e.key, dt, [], [O.value(e.value, dt)]))
                    actions.append({"action": "to-tensor", "rule": "0-d state stored as a number"})
                    self.ledger[e.key] = LedgerEntry(e.key, "written", [out_name], actions, kind="object")
            else:
                self._drop(e, f"non-tensor optimizer state ({e.type_name})")
            return
        shape = tuple(e.shape)
        outs: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]]]]
        if cut:
            outs = [(pname, [] if _scalar_state(e, sname) else cut[0], [])]
        elif _scalar_state(e, sname):
            outs = [(n, [], []) for n, _, _ in pt.outputs()]  # copied to every part
        else:
            outs = [(n, state_ops(ops_), a) for n, ops_, a in pt.outputs()]
        names = []
        changed = False
        for part_name, ops_, part_actions in outs:
            o_name = f"state.{part_name}.{sname}{suffix}"
            if not self._claim(e, o_name):
                return
            self.out.append(OutputTensor(o_name, e.key, e.dtype, list(O.out_shape(shape, ops_)), ops_))
            names.append(o_name)
            changed = changed or bool(ops_)
            actions += [{**a, "rule": a.get("rule", "") + " (follows its parameter)"} for a in part_actions]
        self.ledger[e.key] = LedgerEntry(e.key, fate_of(len(names), changed), names, actions, dtype=e.dtype, shape=list(shape))

    def _claim(self, e: TensorEntry | ObjectEntry, name: str) -> bool:
        """Reserve an output name; a second source for the same name is dropped with a reason."""
        first = self.names.setdefault(name, e.key)
        if first != e.key:
            self._drop(e, f"{first} is already written as {name} (the same parameter's state in two optimizers)")
            return False
        return True

    def _drop(self, e: TensorEntry | ObjectEntry, reason: str) -> None:
        if isinstance(e, TensorEntry):
            self.ledger[e.key] = LedgerEntry(e.key, "dropped", reason=reason, dtype=e.dtype, shape=list(e.shape))
        else:
            self.ledger[e.key] = LedgerEntry(e.key, "dropped", reason=reason, kind="object")


def _scalar_state(e: TensorEntry, sname: str) -> bool:
    """0-d state (``step``), or ``step`` saved as a one-element vector: copied, never cut."""
    return len(e.shape) == 0 or (tuple(e.shape) == (1,) and sname == "step")


def _partial_ops(pt: ModelTensor, rows: PartialRows) -> tuple[list[dict[str, Any]], int, int, PartialRows] | None:
    """Ops cutting a rows-0..k-1 slice like its parameter: (ops, rows kept, rows of the output, rows).

    Only plain trims (``narrow``) follow; a split, reshape or block cut of the parameter cannot
    be applied to a slice of it, and None says so.
    """
    if pt.parts and len(pt.parts) > 1:
        return None
    (_, ops_, _), = pt.outputs()
    out_shape = O.out_shape(pt.entry.shape, ops_)
    cut: list[dict[str, Any]] = []
    kept = rows.rows
    for op in ops_:
        if op["op"] != "narrow" or (op["dim"] == 0 and op["start"] != 0):
            return None
        if op["dim"] == 0:
            if op["length"] < kept:
                kept = op["length"]
                cut.append(O.narrow(0, 0, kept))
        else:
            cut.append(op)
    return cut, kept, out_shape[0], rows


def mark_partial_rows(files: list[OutputFile], partial: dict[str, dict[str, Any]]) -> None:
    """Record each partial slice's row range in its file's metadata (JSON keyed by tensor name)."""
    for f in files:
        mine = {t.name: partial[t.name] for t in f.tensors if t.name in partial}
        if mine:
            f.metadata[PARTIAL_ROWS_KEY] = json.dumps(mine, sort_keys=True)


def state_ops(ops_: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A parameter's ops as they apply to its optimizer state: grown rows start with zero moments.

    New vocab rows of the parameter are initialised from the mean of the others (``--grow-init``),
    but their optimizer state must be fresh: no gradient history.
    """
    return [{**op, "fill": "zeros"} if op["op"] == "grow" else op for op in ops_]


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False
