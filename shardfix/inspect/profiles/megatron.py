"""Megatron-core GPT models (``torch_dist`` checkpoints): stacked layers become per-layer tensors.

By default Megatron saves a block of identical layers stacked: ``decoder.layers.<rest>`` with a
leading ``[L]`` axis (one chunk per layer and tensor-parallel shard) instead of
``decoder.layers.{i}.<rest>``. The model's own ``state_dict()`` names are per layer, so this
profile's one rule cuts the leading axis into ``L`` tensors (layout ``layers``) and runs without
``--split-fused`` (``SPLIT_ALWAYS``); optimizer moments are cut in lockstep with their parameter
and every cut is a ledger action. Per-layer saves (``non_homogeneous_layers``) already carry the
index and match no rule. Vocab padding (a multiple of 128 x TP rows on
``embedding.word_embeddings.weight`` and ``output_layer.weight``) is left to the vocab rule.
"""

from __future__ import annotations

from shardfix.inspect.profiles.base import Evidence, basic_dims, model_shapes, prefix_reason
from shardfix.reconcile.fused import SplitRule, match_pattern
from shardfix.sources.base import SourceIndex

NAME = "megatron"
DESCRIBE = "Megatron-core GPT (embedding.word_embeddings, decoder.layers[.i], output_layer); stacked layers unstacked"
SPLIT_ALWAYS = True

TABLE = (SplitRule("decoder.layers.{name}", "layers", ("decoder.layers.{i}.{name}",)),)
ATTENTION = ()

_MARKERS = ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight")


def detect(index: SourceIndex) -> Evidence:
    shapes = model_shapes(index)
    ev = Evidence(NAME)
    markers = [n for n in _MARKERS if n in shapes]
    if not markers and index.format != "megatron":
        return ev
    stacked = {n: s for n, s in shapes.items() if match_pattern(TABLE[0].pattern, n) is not None}
    ev.score = 100 if index.format == "megatron" else 60
    ev.variant = "stacked-layers" if stacked else "per-layer"
    ev.describe = "Megatron GPT, " + ("layers stacked on a leading axis" if stacked else "per-layer names")
    if index.format == "megatron":
        ev.reasons.append("a Megatron torch_dist iteration directory (metadata.json, common.pt)")
    if markers:
        ev.reasons.append("Megatron names: " + ", ".join(markers))
    basic_dims(ev, shapes)
    if stacked:
        counts = sorted({s[0] for s in stacked.values() if s})
        ev.reasons.append(f"{len(stacked)} stacked decoder.layers tensors with a leading axis of {counts}")
        if len(counts) == 1:
            ev.dims.set("layers", counts[0], f"leading axis of the stacked decoder.layers tensors {counts[0]}")
    ev.reasons += prefix_reason(index)
    return ev


__all__ = ["NAME", "DESCRIBE", "TABLE", "ATTENTION", "SPLIT_ALWAYS", "detect"]
