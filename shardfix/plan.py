"""The planner: every output tensor as read ops plus transforms, grouped into output files, and a
ledger entry for every source entry.

Planning is pure and metadata-only: it sees the source index (keys, shapes, dtypes, small
non-tensor values) and the options, and never reads tensor data. ``shardfix plan`` prints the
result; ``shardfix convert`` executes it; the report records it. The plan's types live in
:mod:`shardfix.plan_types` and optimizer planning in :mod:`shardfix.plan_optimizer`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from shardfix.dtypes import CAST_CHOICES, FLOAT_NAMES
from shardfix.errors import ReconcileConflictError
from shardfix.options import ConvertOptions
from shardfix.plan_optimizer import mark_partial_rows, plan_optimizer
from shardfix.plan_types import (  # noqa: F401 - re-exported: the plan's public types
    COMPANIONS,
    MODEL,
    OPTIMIZER,
    PARTIAL_ROWS_KEY,
    SET_PREFIX,
    LedgerEntry,
    ModelTensor,
    OutputFile,
    OutputTensor,
    Plan,
    pack_in_order,
)
from shardfix.profiles import splitter_for
from shardfix.reconcile import ops as O
from shardfix.reconcile.fused import Drop, check_outputs, source_targets, split_parts
from shardfix.reconcile.keys import Role, classify, is_flat_model, strip_wrappers
from shardfix.reconcile.padding import looks_padded_vocab, reconcile_shape
from shardfix.sources.base import ObjectEntry, SourceIndex, TensorEntry
from shardfix.targets import Targets

_VOCAB_NAME = re.compile(r"(embed|wte|lm_head|head|output|vocab|tok|value_emb|\bve\b|unembed|logit)", re.I)


def _padded_vocab(tensors: dict[str, ModelTensor]) -> int | None:
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
    model: dict[str, ModelTensor] = {}
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
        model[name] = ModelTensor(e, name, actions)

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
    optim_out, param_groups, partial = plan_optimizer(index, roles, model, opts, ledger, warnings, problems)

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
    mark_partial_rows(files, partial)
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
                "bytes": index.total_bytes, "notes": index.notes, "not_converted": index.not_converted,
                **({"companions": {"path": str(companions.path), "format": companions.format}} if companions else {})},
        options=opts.to_dict(),
        files=files,
        ledger=[ledger[e.key] for e in index.entries] + comp_ledger,
        findings=findings,
        warnings=warnings,
        param_groups=param_groups,
    )


def _plan_companions(
    comp: SourceIndex, model: dict[str, ModelTensor], warnings: list[str]
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


def _assign_files(tensors: list[OutputTensor], kind: str, max_bytes: int) -> list[OutputFile]:
    """Group tensors, in order, into files of at most ``max_bytes`` (a bigger tensor gets its own)."""
    if not tensors:
        return []
    groups = pack_in_order(tensors, max_bytes)
    prefix = SET_PREFIX[kind]
    n = len(groups)
    names = [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return [OutputFile(name, kind, g, {"format": "pt"}) for name, g in zip(names, groups, strict=True)]
