"""modded-nanogpt with ``attn.qkvo_w`` and raw ``mlp.c_fc`` / ``mlp.c_proj`` parameters (mid 2025).

``qkvo_w`` is stored as ``[4, hdim, dim]``, ``[hdim, 4 * dim]`` or ``[4 * dim, hdim]`` -- the same
bytes, always read through ``.view(4, hdim, dim)``. The MLP weights are bare parameters of shape
``[dim, 4 * dim]`` (so they batch with the attention weights in the optimizer): ``c_fc`` is used
as ``F.linear(x, c_fc.T)`` (stored ``[in, out]``), ``c_proj`` as ``F.linear(x, c_proj)``.
"""

from __future__ import annotations

from shardfix.inspect.profiles._nanogpt import ATTENTION, OPTIMIZER_GROUPS, common_facts, mlp_hidden
from shardfix.inspect.profiles.base import Evidence, matching, model_shapes, prefix_reason
from shardfix.reconcile.fused import SplitRule
from shardfix.sources.base import SourceIndex

NAME = "nanogpt-qkvo"
DESCRIBE = "modded-nanogpt with attn.qkvo_w ([4, hdim, dim], [hdim, 4d] or [4d, hdim]) and raw mlp.c_fc / mlp.c_proj"

QKVO_OUTPUTS = ("blocks.{i}.attn.c_q.weight", "blocks.{i}.attn.c_k.weight", "blocks.{i}.attn.c_v.weight",
                "blocks.{i}.attn.c_proj.weight")

TABLE = (
    SplitRule("blocks.{i}.attn.qkvo_w", "qkvo", QKVO_OUTPUTS),
    SplitRule("blocks.{i}.mlp.c_fc", "fc", ("blocks.{i}.mlp.c_fc.weight",)),
    SplitRule("blocks.{i}.mlp.c_proj", "proj", ("blocks.{i}.mlp.c_proj.weight",)),
    SplitRule("lm_head.weight", "head", ("lm_head.weight",)),
)


def storage_variant(shape: tuple[int, ...]) -> tuple[str, str] | None:
    """``("qkvo-4hd", words)`` etc. for a ``qkvo_w`` shape, None when it is none of the three."""
    if len(shape) == 3 and shape[0] == 4:
        return "qkvo-4hd", f"qkvo_w stored [4, hdim, dim] = {list(shape)}"
    if len(shape) == 2 and shape[1] == 4 * shape[0]:
        return "qkvo-h4d", f"qkvo_w stored [hdim, 4 * dim] = {list(shape)}"
    if len(shape) == 2 and shape[0] == 4 * shape[1]:
        return "qkvo-4dh", f"qkvo_w stored [4 * dim, hdim] = {list(shape)}"
    return None


def detect(index: SourceIndex) -> Evidence:
    shapes = model_shapes(index)
    qkvo = matching(shapes, r"blocks\.\d+\.attn\.qkvo_w")
    ev = Evidence(NAME)
    if not qkvo:
        return ev
    name, shape = next(iter(qkvo.items()))
    form = storage_variant(shape)
    raw_mlp = matching(shapes, r"blocks\.\d+\.mlp\.c_(fc|proj)")
    ev.score = 75 if form else 35
    ev.variant, words = form or ("qkvo-unknown", f"qkvo_w {list(shape)} is none of the three documented storage shapes")
    ev.describe = words + (" + raw mlp.c_fc / mlp.c_proj parameters" if raw_mlp else "")
    ev.reasons.append(f"{len(qkvo)} x blocks.{{i}}.attn.qkvo_w, e.g. {name} {list(shape)}: {words}")
    if raw_mlp:
        n, s = next(iter(raw_mlp.items()))
        ev.reasons.append(f"raw MLP parameters (no .weight), e.g. {n} {list(s)}; c_fc is stored [in, out]")
    ev.reasons += prefix_reason(index)
    common_facts(ev, shapes)
    if len(shape) == 3:
        ev.dims.set("hdim", shape[1], f"{name} {list(shape)}")
    elif form and ev.dims.dim:
        ev.dims.set("hdim", shape[0] * shape[1] // (4 * ev.dims.dim), f"{name} {list(shape)}")
    mlp_hidden(ev, shapes, r"blocks\.\d+\.mlp\.c_fc")
    return ev


__all__ = ["NAME", "DESCRIBE", "TABLE", "ATTENTION", "OPTIMIZER_GROUPS", "detect"]
