"""Planner stages for model tensors: names, target shapes, shape fixes, fused splits, outputs.

Each stage is a function of the :class:`~shardfix.plan.context.PlanContext`; together they run in
the order :func:`shardfix.plan.build.build_plan` lists.
"""

from __future__ import annotations

import re
from typing import Any

from shardfix.dtypes import CAST_CHOICES, FLOAT_NAMES
from shardfix.inspect.profiles import splitter_for
from shardfix.plan.context import PlanContext
from shardfix.plan.types import LedgerEntry, ModelTensor, OutputTensor, fate_of
from shardfix.reconcile import ops as O
from shardfix.reconcile.fused import Drop, check_outputs, source_targets, split_parts
from shardfix.reconcile.keys import strip_wrappers
from shardfix.reconcile.padding import reconcile_shape
from shardfix.sources.base import ObjectEntry

_VOCAB_NAME = re.compile(r"(embed|wte|lm_head|head|output|vocab|tok|value_emb|\bve\b|unembed|logit)", re.I)
_EMBED_NAME = re.compile(r"(^|\.)(embed|wte|tok_embeddings|word_embeddings|embed_tokens)(\.weight)?$")


def name_model_tensors(ctx: PlanContext) -> None:
    """Model tensors under their own names: containers and wrapper prefixes stripped, each rename an action."""
    seen: dict[str, str] = {}
    for e in ctx.index.entries:
        role = ctx.roles[e.key]
        if role.kind != "model":
            continue
        if isinstance(e, ObjectEntry):
            ctx.record(LedgerEntry(e.key, "dropped", kind="object",
                                   reason=f"non-tensor entry in the model state dict ({e.type_name})"))
            continue
        name, removed = strip_wrappers(role.name)
        for r in removed:
            ctx.prefixes[r + "."] += 1
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
            ctx.problems.append(f"{e.key} and {seen[name]} both become {name!r} after stripping prefixes")
            continue
        seen[name] = e.key
        ctx.model[name] = ModelTensor(e, name, actions)


def apply_profile(ctx: PlanContext) -> None:
    """Pick the profile's split rules; targets named after split outputs then apply to their source."""
    ctx.splitter = splitter_for(ctx.index, ctx.opts, ctx.targets)
    ctx.part_targets = ctx.targets
    shapes = {n: t.entry.shape for n, t in ctx.model.items()}
    ctx.targets = source_targets(ctx.targets, shapes, ctx.opts, ctx.splitter)
    ctx.padded_vocab = padded_vocab(ctx.model)


def padded_vocab(tensors: dict[str, ModelTensor]) -> int | None:
    """The checkpoint's own vocab rows: the larger of the embedding's and the head's.

    Some training scripts pad only the head (embedding 50257 rows, ``lm_head`` 50304), so the
    padded vocab is the largest vocab-sized dim among them; the head may be stored ``[d, V]``.
    """
    rows = []
    for t in tensors.values():
        if len(t.entry.shape) != 2:
            continue
        if _EMBED_NAME.search(t.name):
            rows.append(t.entry.shape[0])
        elif re.search(r"(^|\.)lm_head", t.name):
            rows.append(max(t.entry.shape))
    return max(rows) if rows else None


def vocab_target(shape: tuple[int, ...], padded: int, vocab: int) -> tuple[int, ...] | None:
    """The target shape of a vocab-shaped tensor, or None when it is not one."""
    out = list(shape)
    for d, n in enumerate(shape):
        if n == padded:
            out[d] = vocab
            return tuple(out)
        if d == 0 and len(shape) == 2 and n % padded == 0 and n // padded > 1:
            out[d] = (n // padded) * vocab
            return tuple(out)
    return None


def wanted_shapes(ctx: PlanContext) -> dict[str, tuple[int, ...]]:
    """Every model tensor's target shape: from the vocab, then ``--target-shapes``; conflicts are problems."""
    targets, padded, vocab = ctx.targets, ctx.padded_vocab, ctx.targets.vocab
    wanted: dict[str, tuple[int, ...]] = {}
    flag = ctx.opts.vocab_size
    if flag is not None and (padded is None or padded == flag):
        what = (f"the checkpoint's vocab is already {flag} rows" if padded is not None else
                "the checkpoint has no embedding or output layer to trim")
        ctx.problems.append(f"--vocab-size {flag}: changes nothing ({what}); drop the flag")
    if vocab is not None and padded is not None and vocab != padded:
        for name, t in ctx.model.items():
            tgt = vocab_target(t.entry.shape, padded, vocab)
            if tgt is not None:
                wanted[name] = tgt
                if not _VOCAB_NAME.search(name):
                    ctx.warnings.append(f"{name}: has a dim equal to the padded vocab ({padded}) and is trimmed "
                                        "with the vocab; pass --target-shapes to override")
    for name, shape in targets.shapes.items():
        if name in wanted and wanted[name] != shape:
            ctx.problems.append(
                f"{name}: {targets.origins.get('vocab', 'the vocab')} implies {list(wanted[name])} but "
                f"{targets.origins.get('shapes', 'the target shapes')} say {list(shape)}"
            )
        wanted[name] = shape
    for name in targets.shapes:
        if name not in ctx.model:
            ctx.problems.append(
                f"{name}: named by {targets.origins.get('shapes', 'the target shapes')} but the checkpoint has no "
                "such tensor (names are compared after prefix stripping)"
            )
    if targets.complete:
        for name, t in ctx.model.items():
            if name not in targets.shapes:
                _mismatch(ctx, t, f"{name}: in the checkpoint but not in the target model",
                          " (pass --skip-mismatched to drop it)")
    return wanted


def _mismatch(ctx: PlanContext, t: ModelTensor, msg: str, hint: str = "") -> None:
    """A tensor that cannot be reconciled: dropped with ``--skip-mismatched``, else a problem."""
    if ctx.opts.skip_mismatched:
        t.dropped = msg
        ctx.warnings.append(msg + "; dropped (--skip-mismatched)")
    else:
        ctx.problems.append(msg + hint)


def fix_shapes(ctx: PlanContext, wanted: dict[str, tuple[int, ...]]) -> None:
    """The shape-fixing ops (trim, grow, transpose) of each tensor with a target shape."""
    for name, shape in wanted.items():
        t = ctx.model.get(name)
        if t is None or t.dropped:
            continue
        fix = reconcile_shape(name, t.entry.shape, shape, vocab=ctx.targets.vocab, padded_vocab=ctx.padded_vocab,
                              allow_grow=ctx.opts.allow_grow, grow_init=ctx.opts.grow_init)
        if isinstance(fix, str):
            _mismatch(ctx, t, fix)
        else:
            t.fix = fix


def split_fused(ctx: PlanContext) -> None:
    """Fused weights split by the profile's table; then every output must be named once and fit the architecture."""
    splitter = ctx.splitter
    assert splitter is not None and ctx.part_targets is not None  # set by apply_profile
    if splitter.active:
        for t in ctx.model.values():
            if t.dropped:
                continue
            split = split_parts(t.name, O.out_shape(t.entry.shape, t.fix.ops), ctx.opts, ctx.part_targets, splitter)
            if isinstance(split, str):
                ctx.problems.append(split)
            elif isinstance(split, Drop):
                t.dropped = split.reason
            elif split:
                t.parts = split
    ctx.problems += check_outputs({n: [] if t.dropped else [(o, O.out_shape(t.entry.shape, ops)) for o, ops, _ in t.outputs()]
                                   for n, t in ctx.model.items()}, splitter)


def model_outputs(ctx: PlanContext) -> list[OutputTensor]:
    """The model's output tensors (cast with ``--dtype``) and their ledger entries."""
    cast_to = CAST_CHOICES[ctx.opts.dtype]
    out: list[OutputTensor] = []
    for t in ctx.model.values():
        e = t.entry
        if t.dropped:
            ctx.record(LedgerEntry(e.key, "dropped", [], t.actions, t.dropped, dtype=e.dtype, shape=list(e.shape)))
            continue
        actions = list(t.actions)
        names = []
        for out_name, ops_, part_actions in t.outputs():
            actions += part_actions
            dtype = e.dtype
            if cast_to and e.dtype in FLOAT_NAMES and e.dtype != cast_to:
                ops_ = [*ops_, O.cast(cast_to)]
                if not any(a["action"] == "cast" for a in actions):
                    actions.append({"action": "cast", "from": e.dtype, "to": cast_to, "rule": f"--dtype {ctx.opts.dtype}"})
                dtype = cast_to
            out.append(OutputTensor(out_name, e.key, dtype, list(O.out_shape(e.shape, ops_)), ops_))
            names.append(out_name)
        reshaped = bool(t.fix.ops) or any(p.ops for p in t.parts)
        ctx.record(LedgerEntry(e.key, fate_of(len(names), reshaped), names, actions, dtype=e.dtype, shape=list(e.shape)))
    return out
