"""modded-nanogpt "medium": ``qkvo_w`` plus ``mlp.fc_w`` / ``mlp.proj_w`` and a bare ``lm_head_w``.

``fc_w`` is ``[4d, d]`` and ``proj_w`` ``[d, 4d]`` (both ``[out, in]``); ``lm_head_w`` is
``[vocab, d]``, or ``[d, vocab]`` in later versions, written ``[vocab, d]`` as ``lm_head.weight``.
"""

from __future__ import annotations

from shardfix.inspect.profiles._nanogpt import ATTENTION, OPTIMIZER_GROUPS, common_facts, mlp_hidden
from shardfix.inspect.profiles.base import Evidence, matching, model_shapes, prefix_reason
from shardfix.inspect.profiles.nanogpt_qkvo import QKVO_OUTPUTS, storage_variant
from shardfix.reconcile.fused import SplitRule
from shardfix.sources.base import SourceIndex

NAME = "nanogpt-medium"
DESCRIBE = "modded-nanogpt 'medium': attn.qkvo_w, mlp.fc_w / mlp.proj_w, lm_head_w ([V, d] or [d, V])"

TABLE = (
    SplitRule("blocks.{i}.attn.qkvo_w", "qkvo", QKVO_OUTPUTS),
    SplitRule("blocks.{i}.mlp.fc_w", "fc", ("blocks.{i}.mlp.c_fc.weight",)),
    SplitRule("blocks.{i}.mlp.proj_w", "proj", ("blocks.{i}.mlp.c_proj.weight",)),
    SplitRule("lm_head_w", "head", ("lm_head.weight",)),
)


def detect(index: SourceIndex) -> Evidence:
    shapes = model_shapes(index)
    fc = matching(shapes, r"blocks\.\d+\.mlp\.(fc_w|proj_w)")
    head = shapes.get("lm_head_w")
    ev = Evidence(NAME)
    if not fc and head is None:
        return ev
    ev.score = 90
    ev.reasons.append(f"{len(fc)} x blocks.{{i}}.mlp.fc_w / proj_w" + (", and lm_head_w" if head is not None else ""))
    common_facts(ev, shapes)
    qkvo = matching(shapes, r"blocks\.\d+\.attn\.qkvo_w")
    if qkvo:
        name, shape = next(iter(qkvo.items()))
        form = storage_variant(shape)
        ev.reasons.append(f"attention in qkvo_w, e.g. {name} {list(shape)}" + (f": {form[1]}" if form else ""))
        if len(shape) == 3:
            ev.dims.set("hdim", shape[1], f"{name} {list(shape)}")
    transposed = head is not None and ev.dims.dim is not None and head[0] == ev.dims.dim and head[1] != head[0]
    ev.variant = "medium-head-t" if transposed else "medium"
    ev.describe = "qkvo_w + mlp.fc_w / mlp.proj_w + " + (
        f"lm_head_w stored transposed [dim, vocab] = {list(head or ())}" if transposed else
        f"lm_head_w [vocab, dim] = {list(head)}" if head is not None else "no lm_head_w")
    ev.reasons += prefix_reason(index)
    mlp_hidden(ev, shapes, r"blocks\.\d+\.mlp\.fc_w")
    return ev


__all__ = ["NAME", "DESCRIBE", "TABLE", "ATTENTION", "OPTIMIZER_GROUPS", "detect"]
