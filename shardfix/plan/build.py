"""The planner: every output tensor as read ops plus transforms, grouped into output files, and a
ledger entry for every source entry.

Planning is pure and metadata-only: it sees the source index (keys, shapes, dtypes, small
non-tensor values) and the options, and never reads tensor data. ``shardfix plan`` prints the
result; ``shardfix convert`` executes it; the report records it. :func:`build_plan` runs named
stages over one :class:`~shardfix.plan.context.PlanContext`: model names
(:mod:`shardfix.plan.model`), the profile, target shapes, shape fixes, fused splits, optimizer
state (:mod:`shardfix.plan.optimizer`), model outputs, everything else, companions, files.
"""

from __future__ import annotations

from typing import Any

from shardfix.errors import ReconcileConflictError
from shardfix.options import ConvertOptions
from shardfix.outputs import get_layout
from shardfix.plan.companions import plan_companions
from shardfix.plan.context import PlanContext
from shardfix.plan.guards import check_output_names, size_warnings
from shardfix.plan.model import apply_profile, fix_shapes, model_outputs, name_model_tensors, split_fused, wanted_shapes
from shardfix.plan.optimizer import mark_partial_rows, plan_optimizer
from shardfix.plan.types import (
    COMPANIONS,
    MODEL,
    OPTIMIZER,
    EntryKind,
    LedgerEntry,
    OutputFile,
    OutputTensor,
    Plan,
    pack_in_order,
)
from shardfix.reconcile.padding import looks_padded_vocab
from shardfix.sources.base import ObjectEntry, SourceIndex, TensorEntry
from shardfix.targets import Targets


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
    ctx = PlanContext.start(index, opts, targets or Targets())
    ctx.warnings.extend(index.warnings)
    name_model_tensors(ctx)
    _require_model(ctx)
    apply_profile(ctx)
    fix_shapes(ctx, wanted_shapes(ctx))
    split_fused(ctx)
    optim = plan_optimizer(ctx)
    if ctx.problems:
        raise ReconcileConflictError(ctx.problems)
    model_out = model_outputs(ctx)
    record_the_rest(ctx)
    stored = record_stored(ctx)
    comp_out, comp_ledger = plan_companions(companions, ctx) if companions is not None else ([], [])
    budget = int(opts.max_shard_size)  # parsed to bytes by ConvertOptions
    files = (assign_files(model_out, MODEL, budget) + assign_files(optim.out, OPTIMIZER, budget)
             + assign_files(comp_out, COMPANIONS, budget))
    mark_partial_rows(files, optim.partial)
    check_output_names(files)
    ctx.warnings.extend(size_warnings(files, index.total_bytes))
    _vocab_hint(ctx)
    return Plan(
        source={"path": str(index.path), "format": index.format, "files": [str(p) for p in index.files],
                "bytes": index.total_bytes, "notes": index.notes, "not_converted": index.not_converted,
                **({"companions": {"path": str(companions.path), "format": companions.format}} if companions else {})},
        options=opts.to_dict(),
        files=files,
        ledger=[ctx.ledger[e.key] for e in index.entries] + stored + comp_ledger,
        findings=_findings(ctx),
        warnings=ctx.warnings,
        param_groups=optim.param_groups,
    )


def _require_model(ctx: PlanContext) -> None:
    """Optimizer state without any model tensor cannot be named or cut: say so instead of writing nothing."""
    if ctx.model or not any(r.kind == "optim_state" for r in ctx.roles.values()):
        return
    ctx.problems.append(
        f"{ctx.index.path}: holds optimizer state but no model tensors; moments are named and cut by their "
        "parameters, so convert the checkpoint that holds the model too (a training-stack directory such as "
        "accelerate's save_state output, or a DCP save of get_state_dict(model, optimizer))")


def record_the_rest(ctx: PlanContext) -> None:
    """A ledger entry for every source entry no stage claimed: training metadata, or unmapped."""
    for e in ctx.index.entries:
        if e.key in ctx.ledger:
            continue
        kind: EntryKind = "tensor" if isinstance(e, TensorEntry) else "object"
        extra: dict[str, Any] = {"dtype": e.dtype, "shape": list(e.shape)} if isinstance(e, TensorEntry) else {}
        if ctx.roles[e.key].kind == "meta":
            reason = "training metadata outside the model and optimizer state"
            if isinstance(e, ObjectEntry):
                reason = f"non-tensor training metadata ({e.type_name}); value in findings.metadata"
        else:
            reason = "not mapped to any output"
        ctx.record(LedgerEntry(e.key, "dropped", reason=reason, kind=kind, **extra))


def record_stored(ctx: PlanContext) -> list[LedgerEntry]:
    """Ledger entries for the physical tensors assembled entries were built from (DeepSpeed partitions).

    Each gets the outputs of the entries it feeds, an ``assemble`` action naming them, and an
    ``unpad`` action for the padding elements left out; one that feeds nothing is dropped with its reason.
    """
    out = []
    for st in ctx.index.stored:
        outputs = list(dict.fromkeys(o for k in st.feeds if k in ctx.ledger for o in ctx.ledger[k].outputs))
        actions: list[dict[str, Any]] = []
        if st.feeds:
            shown = ", ".join(st.feeds[:8]) + (f" and {len(st.feeds) - 8} more" if len(st.feeds) > 8 else "")
            actions.append({"action": "assemble", "rule": f"pieces of {shown}"})
        if st.padding:
            actions.append({"action": "unpad", "rule": f"{st.padding} padding element(s) left out"})
        if not outputs:
            why = st.note or ("the entries it feeds are not written" if st.feeds else "feeds no tensor")
            out.append(LedgerEntry(st.key, "dropped", [], actions, why, dtype=st.dtype, shape=list(st.shape)))
        else:
            out.append(LedgerEntry(st.key, "split" if len(outputs) > 1 else "written", outputs, actions,
                                   dtype=st.dtype, shape=list(st.shape)))
    return out


def _findings(ctx: PlanContext) -> dict[str, Any]:
    return {
        "layout": "flat state dict" if ctx.flat else "containers",
        "prefixes_stripped": dict(ctx.prefixes),
        "profile": ctx.splitter.evidence if ctx.splitter else None,
        "padded_vocab": ctx.padded_vocab,
        "target_vocab": ctx.targets.vocab,
        "metadata": {e.key: e.value for e in ctx.index.objects()
                     if ctx.roles[e.key].kind == "meta" and isinstance(e.value, (int, float, str, bool))
                     and not (isinstance(e.value, str) and len(e.value) > 200)},
    }


def _vocab_hint(ctx: PlanContext) -> None:
    padded = ctx.padded_vocab
    if padded and looks_padded_vocab(padded) and ctx.targets.vocab is None and not ctx.targets.shapes:
        ctx.warnings.append(
            f"the vocab dim is {padded} rows, a multiple of 64 -- likely padded; pass --vocab-size "
            "(or --tokenizer / --target-config) to trim it to the true vocab"
        )


def assign_files(tensors: list[OutputTensor], kind: str, max_bytes: int) -> list[OutputFile]:
    """Group tensors, in order, into files of at most ``max_bytes`` (a bigger tensor gets its own)."""
    if not tensors:
        return []
    groups = pack_in_order(tensors, max_bytes)
    names = get_layout().file_names(kind, len(groups))
    return [OutputFile(name, kind, g, {"format": "pt"}) for name, g in zip(names, groups, strict=True)]
