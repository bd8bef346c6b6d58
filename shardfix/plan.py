"""The plan: every output tensor as read ops plus transforms, grouped into output files, and a
ledger entry for every source entry.

Planning is pure and metadata-only: it sees the source index (keys, shapes, dtypes, small
non-tensor values) and the options, and never reads tensor data. ``shardfix plan`` prints the
result; ``shardfix convert`` executes it; the report records it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from shardfix.dtypes import CAST_CHOICES, FLOAT_NAMES, itemsize, numel
from shardfix.errors import ReconcileConflictError
from shardfix.options import ConvertOptions
from shardfix.profiles import splitter_for
from shardfix.reconcile import ops as O
from shardfix.reconcile.fused import Drop, Part, check_outputs, source_targets, split_parts
from shardfix.reconcile.keys import Role, classify, is_flat_model, strip_wrappers
from shardfix.reconcile.optimizer import (
    IdMapping,
    PartialRows,
    map_ids,
    names_per_optimizer,
    partial_rows,
    read_param_names,
)
from shardfix.reconcile.padding import ShapeFix, looks_padded_vocab, reconcile_shape
from shardfix.sources.base import ObjectEntry, SourceIndex, TensorEntry
from shardfix.targets import Targets

T = TypeVar("T")

MODEL = "model"
OPTIMIZER = "optimizer"
COMPANIONS = "companions"
SET_PREFIX = {MODEL: "model", OPTIMIZER: "optimizer", COMPANIONS: "companions"}

_VOCAB_NAME = re.compile(r"(embed|wte|lm_head|head|output|vocab|tok|value_emb|\bve\b|unembed|logit)", re.I)


@dataclass(slots=True)
class OutputTensor:
    """One tensor to write: read ``source`` (or make it from ``ops[0]``), apply ``ops``."""

    name: str
    source: str
    dtype: str
    shape: list[int]
    ops: list[dict[str, Any]] = field(default_factory=list)
    #: which input the source key belongs to: "source" (the checkpoint) or "companions"
    origin: str = "source"

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * itemsize(self.dtype)


@dataclass(slots=True)
class OutputFile:
    name: str
    set: str
    tensors: list[OutputTensor] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def fingerprint(self) -> str:
        """A hash of everything that determines this file's bytes (used by ``--resume``)."""
        doc = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(doc.encode()).hexdigest()[:32]


@dataclass(slots=True)
class LedgerEntry:
    source: str
    fate: str  # written | reconciled | split | recorded | dropped
    outputs: list[str] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None
    kind: str = "tensor"
    dtype: str | None = None
    shape: list[int] | None = None
    #: set for entries of a second input (``--companions``); None for the checkpoint itself
    origin: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for optional in ("reason", "origin"):
            if d[optional] is None:
                d.pop(optional)
        return d


@dataclass(slots=True)
class Plan:
    source: dict[str, Any]
    options: dict[str, Any]
    files: list[OutputFile]
    ledger: list[LedgerEntry]
    findings: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    param_groups: list[dict[str, Any]] | None = None

    def files_of(self, kind: str) -> list[OutputFile]:
        return [f for f in self.files if f.set == kind]

    @property
    def total_bytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "options": self.options,
            "findings": self.findings,
            "files": [asdict(f) for f in self.files],
            "param_groups": self.param_groups,
            "ledger": [e.to_dict() for e in self.ledger],
            "warnings": self.warnings,
        }

    def summary(self) -> str:
        fates: dict[str, int] = defaultdict(int)
        for e in self.ledger:
            fates[e.fate] += 1
        lines = [
            f"source: {self.source['path']} ({self.source['format']}, {len(self.source['files'])} files, "
            f"{_human(self.source['bytes'])})",
            "ledger: " + ", ".join(f"{n} {k}" for k, n in sorted(fates.items())) + f" ({len(self.ledger)} entries)",
        ]
        for kind in (MODEL, OPTIMIZER, COMPANIONS):
            fs = self.files_of(kind)
            if fs:
                n = sum(len(f.tensors) for f in fs)
                lines.append(f"{kind}: {n} tensors in {len(fs)} file(s), {_human(sum(f.nbytes for f in fs))}")
        changed = [e for e in self.ledger if e.fate in ("reconciled", "split")]
        for e in changed[:20]:
            acts = "; ".join(_action_text(a) for a in e.actions if a["action"] != "rename")
            lines.append(f"  {e.fate}: {e.source} -> {', '.join(e.outputs)}: {acts}")
        if len(changed) > 20:
            lines.append(f"  ... and {len(changed) - 20} more")
        dropped = [e for e in self.ledger if e.fate == "dropped" and e.kind == "tensor"]
        for e in dropped[:10]:
            lines.append(f"  dropped: {e.source}: {e.reason}")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _action_text(a: dict[str, Any]) -> str:
    if a["action"] in ("trim", "grow"):
        return f"{a['action']} ({a['rule']}) {a['from']} -> {a['to']}"
    if a["action"] == "cast":
        return f"cast {a['from']} -> {a['to']}"
    return a["action"] + (f" ({a['rule']})" if "rule" in a else "")


@dataclass(slots=True)
class _ModelTensor:
    entry: TensorEntry
    name: str
    actions: list[dict[str, Any]]
    fix: ShapeFix = field(default_factory=ShapeFix)
    dropped: str | None = None
    #: outputs made from this tensor after the shape fix: one, or several for a fused split.
    parts: list[Part] = field(default_factory=list)

    def outputs(self) -> list[tuple[str, list[dict[str, Any]], list[dict[str, Any]]]]:
        """(output name, ops, actions) for each output, the shape fix first, in source order."""
        parts = self.parts or [Part(self.name)]
        return [(p.name, [*self.fix.ops, *p.ops], [*self.fix.actions, *p.actions]) for p in parts]


def _padded_vocab(tensors: dict[str, _ModelTensor]) -> int | None:
    """The checkpoint's own vocab rows: the larger of the embedding's and the head's.

    Some training scripts pad only the head (embedding 50257 rows, ``lm_head`` 50304), so the
    padded vocab is the largest vocab-sized dim among them; the head may be stored ``[d, V]``.
    """
    rows = []
    for t in tensors.values():
        if len(t.entry.shape) != 2:
            continue
        if re.search(r"(^|\.)(embed|wte|tok_embeddings|word_embeddings|embed_tokens)(\.weight)?$", t.name):
            rows.append(t.entry.shape[0])
        elif re.search(r"(^|\.)lm_head", t.name):
            rows.append(max(t.entry.shape))
    return max(rows) if rows else None


def _vocab_target(shape: tuple[int, ...], padded: int, vocab: int) -> tuple[int, ...] | None:
    """The target shape of a vocab-shaped tensor, or None when it is not one."""
    if len(shape) < 1:
        return None
    out = list(shape)
    hit = False
    for d, n in enumerate(shape):
        if n == padded:
            out[d] = vocab
            hit = True
            break
        if d == 0 and len(shape) == 2 and n % padded == 0 and n // padded > 1:
            out[d] = (n // padded) * vocab
            hit = True
            break
    return tuple(out) if hit else None


def build_plan(
    index: SourceIndex, opts: ConvertOptions, targets: Targets | None = None, companions: SourceIndex | None = None
) -> Plan:
    """Plan the conversion of ``index`` under ``opts`` and ``targets`` (no tensor data read).

    ``companions`` is the index of a ``--companions`` file: side tensors keyed by parameter name
    (masks, EMA copies) that receive exactly their parameter's cuts and go to their own file set.

    Raises:
        ReconcileConflictError: listing every unreconcilable tensor at once (unless
            ``--skip-mismatched``), every name collision and every target problem.
    """
    targets = targets or Targets()
    problems: list[str] = []
    warnings: list[str] = []
    ledger: dict[str, LedgerEntry] = {}
    tensor_paths = [e.path for e in index.tensors()]
    flat = is_flat_model([e.path for e in index.entries], tensor_paths)
    roles: dict[str, Role] = {e.key: classify(e.path, flat) for e in index.entries}

    # -- model tensors: names ----------------------------------------------------------
    model: dict[str, _ModelTensor] = {}
    seen: dict[str, str] = {}
    prefixes: dict[str, int] = defaultdict(int)
    for e in index.entries:
        role = roles[e.key]
        if role.kind != "model":
            continue
        if isinstance(e, ObjectEntry):
            ledger[e.key] = LedgerEntry(e.key, "dropped", kind="object",
                                        reason=f"non-tensor entry in the model state dict ({e.type_name})")
            continue
        name, removed = strip_wrappers(role.name)
        for r in removed:
            prefixes[r + "."] += 1
        actions: list[dict[str, Any]] = []
        if e.layout != "strided":
            actions.append({"action": "densify", "rule": f"{e.layout} tensor written dense"})
        if name != e.key:
            why = []
            if role.container:
                why.append(f"container {'.'.join(map(str, role.container))!r}")
            if removed:
                why.append("wrappers " + ", ".join(f"{r}." for r in removed))
            actions.append({"action": "rename", "from": e.key, "to": name, "rule": "strip " + " and ".join(why)})
        if name in seen:
            problems.append(f"{e.key} and {seen[name]} both become {name!r} after stripping prefixes")
            continue
        seen[name] = e.key
        model[name] = _ModelTensor(e, name, actions)

    # -- profile (shardfix.profiles): targets named after split outputs apply to their source ------
    splitter = splitter_for(index, opts, targets)
    part_targets, targets = targets, source_targets(targets, {n: t.entry.shape for n, t in model.items()}, opts, splitter)

    # -- target shapes --------------------------------------------------------------------
    padded_vocab = _padded_vocab(model)
    vocab = targets.vocab
    wanted: dict[str, tuple[int, ...]] = {}
    if vocab is not None and padded_vocab is not None and vocab != padded_vocab:
        for name, t in model.items():
            tgt = _vocab_target(t.entry.shape, padded_vocab, vocab)
            if tgt is not None:
                wanted[name] = tgt
                if not _VOCAB_NAME.search(name):
                    warnings.append(f"{name}: has a dim equal to the padded vocab ({padded_vocab}) and is trimmed "
                                    "with the vocab; pass --target-shapes to override")
    for name, shape in targets.shapes.items():
        if name in wanted and wanted[name] != shape:
            problems.append(
                f"{name}: {targets.origins.get('vocab', 'the vocab')} implies {list(wanted[name])} but "
                f"{targets.origins.get('shapes', 'the target shapes')} say {list(shape)}"
            )
        wanted[name] = shape
    for name in targets.shapes:
        if name not in model:
            problems.append(
                f"{name}: named by {targets.origins.get('shapes', 'the target shapes')} but the checkpoint has no "
                "such tensor (names are compared after prefix stripping)"
            )
    if targets.complete:
        for name, t in model.items():
            if name not in targets.shapes:
                msg = f"{name}: in the checkpoint but not in the target model"
                if opts.skip_mismatched:
                    t.dropped = msg
                    warnings.append(msg + "; dropped (--skip-mismatched)")
                else:
                    problems.append(msg + " (pass --skip-mismatched to drop it)")
    for name, shape in wanted.items():
        t = model.get(name)
        if t is None or t.dropped:
            continue
        fix = reconcile_shape(
            name, t.entry.shape, shape, vocab=vocab, padded_vocab=padded_vocab,
            allow_grow=opts.allow_grow, grow_init=opts.grow_init,
        )
        if isinstance(fix, str):
            if opts.skip_mismatched:
                t.dropped = fix
                warnings.append(fix + "; dropped (--skip-mismatched)")
            else:
                problems.append(fix)
        else:
            t.fix = fix

    # -- fused weights ---------------------------------------------------------------------------
    if splitter.active:
        for t in model.values():
            if t.dropped:
                continue
            split = split_parts(t.name, O.out_shape(t.entry.shape, t.fix.ops), opts, part_targets, splitter)
            if isinstance(split, str):
                problems.append(split)
            elif isinstance(split, Drop):
                t.dropped = split.reason
            elif split:
                t.parts = split
    # every output once: name clashes, unused key-map entries, the architecture check (--target-config)
    problems += check_outputs({n: [] if t.dropped else [(o, O.out_shape(t.entry.shape, ops)) for o, ops, _ in t.outputs()]
                               for n, t in model.items()}, splitter)

    # -- optimizer ---------------------------------------------------------------------------
    optim_out, param_groups, partial = _plan_optimizer(index, roles, model, opts, ledger, warnings, problems)

    if problems:
        raise ReconcileConflictError(problems)

    # -- outputs and ledger for the model --------------------------------------------------
    cast_to = CAST_CHOICES[opts.dtype]
    model_out: list[OutputTensor] = []
    for name, t in model.items():
        e = t.entry
        if t.dropped:
            ledger[e.key] = LedgerEntry(e.key, "dropped", [], t.actions, t.dropped, dtype=e.dtype, shape=list(e.shape))
            continue
        actions = list(t.actions)
        names = []
        for out_name, ops_, part_actions in t.outputs():
            actions += part_actions
            dtype = e.dtype
            if cast_to and e.dtype in FLOAT_NAMES and e.dtype != cast_to:
                ops_ = [*ops_, O.cast(cast_to)]
                if not any(a["action"] == "cast" for a in actions):
                    actions.append({"action": "cast", "from": e.dtype, "to": cast_to, "rule": f"--dtype {opts.dtype}"})
                dtype = cast_to
            model_out.append(OutputTensor(out_name, e.key, dtype, list(O.out_shape(e.shape, ops_)), ops_))
            names.append(out_name)
        reshaped = bool(t.fix.ops) or any(p.ops for p in t.parts)
        fate = "split" if len(names) > 1 else "reconciled" if reshaped else "written"
        ledger[e.key] = LedgerEntry(e.key, fate, names, actions, dtype=e.dtype, shape=list(e.shape))

    # -- everything else -------------------------------------------------------------------------
    for e in index.entries:
        if e.key in ledger:
            continue
        kind = "tensor" if isinstance(e, TensorEntry) else "object"
        extra = {"dtype": e.dtype, "shape": list(e.shape)} if isinstance(e, TensorEntry) else {}
        role = roles[e.key]
        if role.kind == "meta":
            reason = "training metadata outside the model and optimizer state"
            if isinstance(e, ObjectEntry):
                reason = f"non-tensor training metadata ({e.type_name}); value in findings.metadata"
            ledger[e.key] = LedgerEntry(e.key, "dropped", reason=reason, kind=kind, **extra)
        else:
            ledger[e.key] = LedgerEntry(e.key, "dropped", reason="not mapped to any output", kind=kind, **extra)

    comp_out: list[OutputTensor] = []
    comp_ledger: list[LedgerEntry] = []
    if companions is not None:
        comp_out, comp_ledger = _plan_companions(companions, model, warnings)
    files = (_assign_files(model_out, MODEL, opts.max_shard_size) + _assign_files(optim_out, OPTIMIZER, opts.max_shard_size)
             + _assign_files(comp_out, COMPANIONS, opts.max_shard_size))
    _mark_partial_rows(files, partial)
    findings = {
        "layout": "flat state dict" if flat else "containers",
        "prefixes_stripped": dict(prefixes),
        "profile": splitter.evidence,
        "padded_vocab": padded_vocab,
        "target_vocab": vocab,
        "metadata": {e.key: e.value for e in index.objects()
                     if roles[e.key].kind == "meta" and isinstance(e.value, (int, float, str, bool))
                     and not (isinstance(e.value, str) and len(e.value) > 200)},
    }
    if padded_vocab and looks_padded_vocab(padded_vocab) and vocab is None and not targets.shapes:
        warnings.append(
            f"the vocab dim is {padded_vocab} rows, a multiple of 64 -- likely padded; pass --vocab-size "
            "(or --tokenizer / --target-config) to trim it to the true vocab"
        )
    return Plan(
        source={"path": str(index.path), "format": index.format, "files": [str(p) for p in index.files],
                "bytes": index.total_bytes, "notes": index.notes,
                **({"companions": {"path": str(companions.path), "format": companions.format}} if companions else {})},
        options=opts.to_dict(),
        files=files,
        ledger=[ledger[e.key] for e in index.entries] + comp_ledger,
        findings=findings,
        warnings=warnings,
        param_groups=param_groups,
    )


#: safetensors metadata key of optimizer files: JSON ``{tensor name: row range}`` for partial slices.
PARTIAL_ROWS_KEY = "shardfix.partial_rows"


def _plan_optimizer(
    index: SourceIndex,
    roles: dict[str, Role],
    model: dict[str, _ModelTensor],
    opts: ConvertOptions,
    ledger: dict[str, LedgerEntry],
    warnings: list[str],
    problems: list[str],
) -> tuple[list[OutputTensor], list[dict[str, Any]] | None, dict[str, dict[str, Any]]]:
    """Plan optimizer state: name it, cut it like its parameter, describe the param groups.

    Returns:
        The optimizer tensors to write, the param groups (None when there is no optimizer) and,
        for ``--partial-optimizer``, the row range of each partial slice written, by output name.
    """
    states: dict[int, dict[Any, dict[str, TensorEntry | ObjectEntry]]] = defaultdict(lambda: defaultdict(dict))
    groups: dict[int, dict[int, dict[str, Any]]] = defaultdict(lambda: defaultdict(dict))
    for e in index.entries:
        role = roles[e.key]
        if role.kind == "optim_state":
            states[role.optimizer][role.param][role.state] = e
        elif role.kind == "param_group":
            if isinstance(e, TensorEntry):
                ledger[e.key] = LedgerEntry(
                    e.key, "dropped", dtype=e.dtype, shape=list(e.shape),
                    reason=f"tensor {role.hparam!r} stored inside param group {role.group} (an optimizer buffer or "
                    "tensor hyperparameter, not per-parameter state); not written",
                )
                warnings.append(f"{e.key}: a tensor inside a param group; dropped (not per-parameter state)")
                continue
            groups[role.optimizer][role.group][role.hparam] = (e.key, e.value)
    if not states and not groups:
        return [], None, {}
    if opts.no_optimizer:
        for e in index.entries:
            if roles[e.key].kind in ("optim_state", "param_group") and e.key not in ledger:
                ledger[e.key] = LedgerEntry(e.key, "dropped", kind="tensor" if isinstance(e, TensorEntry) else "object",
                                            reason="--no-optimizer")
        return [], None, {}

    optimizers = sorted(set(states) | set(groups))
    model_params = [(n, t.entry.shape) for n, t in model.items()]
    refs = {opt: _optimizer_ids(groups.get(opt, {}), states.get(opt, {})) for opt in optimizers}
    names_file: list[list[str]] | None = None
    if opts.param_names:
        split = names_per_optimizer(read_param_names(opts.param_names),
                                    [sum(1 for _, n in refs[o] if n is not _STATE_ONLY) for o in optimizers])
        if isinstance(split, str):
            problems.append(split)
        else:
            names_file = [[strip_wrappers(n)[0] for n in names] for names in split]
    plan = _OptimPlan(model, opts, ledger, warnings)
    param_groups: list[dict[str, Any]] = []
    for k, opt in enumerate(optimizers):
        label = f"optimizer {opt}" if len(optimizers) > 1 else "the optimizer"
        gdict = groups.get(opt, {})
        st = states.get(opt, {})
        ids = [ref for ref, _ in refs[opt]]
        gnames = [None if n is _STATE_ONLY else n for _, n in refs[opt]]
        if all(isinstance(i, str) for i in ids):
            mapping = IdMapping({i: strip_wrappers(i)[0] for i in ids}, "parameter names (FQN-keyed state)")
        else:
            shapes = {ref: next((tuple(s.shape) for s in st[ref].values()
                                 if isinstance(s, TensorEntry) and len(s.shape) > 0), None) for ref in st}
            mapping = map_ids(ids, [strip_wrappers(n)[0] if n else None for n in gnames], shapes, model_params,
                              param_names_file=_names_for(names_file, k, refs[opt]), trainable=opts.trainable,
                              label=label)
        if not mapping.ok:
            for msg in mapping.problems:
                warnings.append(msg + f"; the model is converted, no optimizer state is written for {label}")
            for sd in st.values():
                for e in sd.values():
                    ledger[e.key] = LedgerEntry(e.key, "dropped", reason=mapping.problems[0],
                                                kind="tensor" if isinstance(e, TensorEntry) else "object")
            for g in gdict.values():
                for key, _ in g.values():
                    ledger[key] = LedgerEntry(key, "dropped", kind="object", reason=mapping.problems[0])
            continue
        partial_before = len(plan.partial_seen)
        for ref, sd in st.items():
            plan.param(sd, ref, mapping.names[ref], mapping.method)
        found = plan.partial_seen[partial_before:]
        if found:
            shown = "; ".join(f"{key}: {what}" for key, what in found[:3])
            more = f"; and {len(found) - 3} more" if len(found) > 3 else ""
            what = (f"written under explicit .rows_A_B names with the row range in the {PARTIAL_ROWS_KEY!r} "
                    "metadata (--partial-optimizer)" if opts.partial_optimizer else
                    "dropped (pass --partial-optimizer to write the slices under explicit names)")
            warnings.append(f"{label}: {len(found)} state tensors hold only part of their parameter's rows -- the "
                            f"saved state is incomplete and is not written as the full state ({shown}{more}); {what}")
        for g in sorted(gdict):
            group: dict[str, Any] = {"optimizer": opt, "group": g}
            for fname, (key, value) in gdict[g].items():
                ledger[key] = LedgerEntry(key, "recorded", ["optimizer_param_groups.json"], kind="object")
                if fname not in ("params", "param_names"):
                    group[fname] = value if _jsonable(value) else repr(value)
            params = gdict[g].get("params", (None, []))[1] or []
            group["params"] = [mapping.names.get(p, str(p)) for p in params]
            param_groups.append(group)
    return plan.out, param_groups, plan.partial


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

    model: dict[str, _ModelTensor]
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

    def _write(self, e: TensorEntry | ObjectEntry, ref: Any, pname: str, sname: str, method: str, pt: _ModelTensor,
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
        if cut:
            outs = [(pname, [] if _scalar_state(e, sname) else cut[0], [])]
        elif _scalar_state(e, sname):
            outs = [(n, [], []) for n, _, _ in pt.outputs()]  # copied to every part
        else:
            outs = [(n, _state_ops(ops_), a) for n, ops_, a in pt.outputs()]
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
        fate = "split" if len(names) > 1 else "reconciled" if changed else "written"
        self.ledger[e.key] = LedgerEntry(e.key, fate, names, actions, dtype=e.dtype, shape=list(shape))

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


def _partial_ops(pt: _ModelTensor, rows: PartialRows) -> tuple[list[dict[str, Any]], int, int, PartialRows] | None:
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


def _mark_partial_rows(files: list[OutputFile], partial: dict[str, dict[str, Any]]) -> None:
    """Record each partial slice's row range in its file's metadata (JSON keyed by tensor name)."""
    for f in files:
        mine = {t.name: partial[t.name] for t in f.tensors if t.name in partial}
        if mine:
            f.metadata[PARTIAL_ROWS_KEY] = json.dumps(mine, sort_keys=True)


def _plan_companions(
    comp: SourceIndex, model: dict[str, _ModelTensor], warnings: list[str]
) -> tuple[list[OutputTensor], list[LedgerEntry]]:
    """Side tensors keyed by parameter name follow their parameter's cuts, or are skipped by name."""
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
        raw = role.name if role.kind == "model" else ".".join(str(p) for p in e.path[1:] or e.path)
        name, _ = strip_wrappers(raw)
        pt = model.get(name)
        actions: list[dict[str, Any]] = []
        if e.layout != "strided":
            actions.append({"action": "densify", "rule": f"{e.layout} tensor written dense"})
        reason = None
        if pt is None:
            reason = f"no parameter named {name!r} in the checkpoint"
        elif pt.dropped:
            reason = f"its parameter {name} was dropped"
        elif tuple(e.shape) != pt.entry.shape:
            reason = (f"shape {list(e.shape)} does not match its parameter {name} {list(pt.entry.shape)} "
                      "(made for another model?)")
        if reason:
            skipped.append(e.key)
            ledger.append(LedgerEntry(e.key, "dropped", actions=actions, reason=reason, dtype=e.dtype,
                                      shape=list(e.shape), origin=COMPANIONS))
            continue
        names = []
        changed = False
        for part_name, ops_, part_actions in pt.outputs():
            out.append(OutputTensor(part_name, e.key, e.dtype, list(O.out_shape(e.shape, ops_)), ops_, COMPANIONS))
            names.append(part_name)
            changed = changed or bool(ops_)
            actions += [{**a, "rule": a.get("rule", "") + " (follows its parameter)"} for a in part_actions]
        fate = "split" if len(names) > 1 else "reconciled" if changed else "written"
        ledger.append(LedgerEntry(e.key, fate, names, actions, dtype=e.dtype, shape=list(e.shape), origin=COMPANIONS))
    if skipped:
        warnings.append(f"--companions: skipped {len(skipped)} side tensor(s) that do not fit the checkpoint: "
                        + ", ".join(skipped[:20]) + (" ..." if len(skipped) > 20 else ""))
    return out, ledger


def _state_ops(ops_: list[dict[str, Any]]) -> list[dict[str, Any]]:
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


def pack_in_order(items: list[T], budget: int) -> list[list[T]]:
    """Group ``items`` (anything with ``nbytes``), keeping their order, into runs of at most
    ``budget`` bytes; an item larger than the budget is a group of its own."""
    groups: list[list[T]] = [[]]
    size = 0
    for item in items:
        if groups[-1] and size + item.nbytes > budget:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item.nbytes
    return groups if groups[0] else []


def _assign_files(tensors: list[OutputTensor], kind: str, max_bytes: int) -> list[OutputFile]:
    """Group tensors, in order, into files of at most ``max_bytes`` (a bigger tensor gets its own)."""
    if not tensors:
        return []
    groups = pack_in_order(tensors, max_bytes)
    prefix = SET_PREFIX[kind]
    n = len(groups)
    names = [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return [OutputFile(name, kind, g, {"format": "pt"}) for name, g in zip(names, groups, strict=True)]
