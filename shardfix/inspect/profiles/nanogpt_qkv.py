"""modded-nanogpt "small" (early 2025): ``attn.qkv_w`` ``[3, hdim, dim]`` + Linear ``c_proj`` / ``c_fc``.

The attention reads ``F.linear(x, qkv_w.flatten(end_dim=1))`` and chunks q, k, v; the output
projection and the MLP are ordinary ``CastedLinear`` weights (``[out, in]``). The embedding may
have the true vocab while ``lm_head`` is padded to a multiple of 128.
"""

from __future__ import annotations

from shardfix.inspect.profiles._nanogpt import ATTENTION, OPTIMIZER_GROUPS, common_facts, mlp_hidden
from shardfix.inspect.profiles.base import Evidence, matching, model_shapes, prefix_reason
from shardfix.reconcile.fused import SplitRule
from shardfix.sources.base import SourceIndex

NAME = "nanogpt-qkv"
DESCRIBE = "modded-nanogpt with attn.qkv_w [3, hdim, dim] and Linear c_proj / mlp.c_fc / mlp.c_proj ('small')"

TABLE = (
    SplitRule("blocks.{i}.attn.qkv_w", "qkv",
              ("blocks.{i}.attn.c_q.weight", "blocks.{i}.attn.c_k.weight", "blocks.{i}.attn.c_v.weight")),
    SplitRule("lm_head.weight", "head", ("lm_head.weight",)),
)


def detect(index: SourceIndex) -> Evidence:
    shapes = model_shapes(index)
    qkv = matching(shapes, r"blocks\.\d+\.attn\.qkv_w")
    ev = Evidence(NAME)
    if not qkv:
        return ev
    name, shape = next(iter(qkv.items()))
    stacked = len(shape) == 3 and shape[0] == 3
    ev.score = 80 if stacked else 40
    ev.variant = "small-qkv"
    ev.describe = "attn.qkv_w [3, hdim, dim] + attn.c_proj.weight, mlp.c_fc.weight, mlp.c_proj.weight"
    ev.reasons.append(f"{len(qkv)} x blocks.{{i}}.attn.qkv_w, e.g. {name} {list(shape)}"
                      + (": q, k, v stacked on dim 0" if stacked else ": not [3, hdim, dim]"))
    fc = matching(shapes, r"blocks\.\d+\.mlp\.c_fc\.weight")
    if fc:
        ev.reasons.append(f"Linear MLP weights, e.g. {next(iter(fc))} {list(next(iter(fc.values())))}")
    ev.reasons += prefix_reason(index)
    common_facts(ev, shapes)
    if stacked:
        ev.dims.set("hdim", shape[1], f"{name} {list(shape)}")
        ev.dims.set("dim", shape[2], f"{name} {list(shape)}")
    mlp_hidden(ev, shapes, r"blocks\.\d+\.mlp\.c_fc\.weight")
    return ev


__all__ = ["NAME", "DESCRIBE", "TABLE", "ATTENTION", "OPTIMIZER_GROUPS", "detect"]
