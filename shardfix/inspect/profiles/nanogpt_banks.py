"""modded-nanogpt with parameter banks (2026): every layer's weights stacked in a few tensors.

* ``attn_bank`` ``[slots, 4 * dim, hdim]``: a layer's q, k, v, o rows (``qkvo_w[:3 * dim]`` feeds
  q, k, v; ``qkvo_w[3 * dim:]`` is the output weight).
* ``mlp_bank`` ``[slots, 2, 4 * dim, dim]``: ``c_fc`` and ``c_proj``, the latter stored
  ``[in, out]`` (used as ``x @ W``). A padding slot (index 11 of 12 for 11 layers) rounds the
  bank so its matrices divide evenly across GPUs.
* ``qk_bank`` ``[groups, 2 * head_dim, dim]`` / ``vo_bank`` ``[slots, hdim, dim]`` (later
  versions): per layer ``heads`` groups of q heads then k heads, and v then o; both padded with
  zero rows to a multiple of the world size.
* ``lm_head.weight`` is stored transposed ``[dim, vocab]`` (``CastedLinearT``).

Which slots are layers and which are padding needs the layer count: from a per-layer vector
(``x0_lambdas`` ``[layers]``) or a config's ``num_hidden_layers``.
"""

from __future__ import annotations

from shardfix.inspect.profiles._nanogpt import ATTENTION, OPTIMIZER_GROUPS, common_facts
from shardfix.inspect.profiles.base import Evidence, model_shapes, prefix_reason
from shardfix.reconcile.fused import SplitRule
from shardfix.sources.base import SourceIndex

NAME = "nanogpt-banks"
DESCRIBE = "modded-nanogpt parameter banks (2026): attn_bank / qk_bank + vo_bank, mlp_bank with padding slots"

BANKS = ("attn_bank", "mlp_bank", "qk_bank", "vo_bank")

TABLE = (
    SplitRule("attn_bank", "attn_bank", ("blocks.{i}.attn.c_q.weight", "blocks.{i}.attn.c_k.weight",
                                         "blocks.{i}.attn.c_v.weight", "blocks.{i}.attn.c_proj.weight")),
    SplitRule("qk_bank", "qk_bank", ("blocks.{i}.attn.c_q.weight", "blocks.{i}.attn.c_k.weight")),
    SplitRule("vo_bank", "vo_bank", ("blocks.{i}.attn.c_v.weight", "blocks.{i}.attn.c_proj.weight")),
    SplitRule("mlp_bank", "mlp_bank", ("blocks.{i}.mlp.c_fc.weight", "blocks.{i}.mlp.c_proj.weight")),
    SplitRule("lm_head.weight", "head", ("lm_head.weight",)),
)


def detect(index: SourceIndex) -> Evidence:
    shapes = model_shapes(index)
    banks = {n: shapes[n] for n in BANKS if n in shapes}
    ev = Evidence(NAME)
    if not banks:
        return ev
    ev.score = 100
    ev.variant = "banks-qk-vo" if "qk_bank" in banks else "banks"
    ev.describe = " + ".join(banks) + " (per-layer weights stacked in banks)"
    ev.reasons.append("parameter banks: " + ", ".join(f"{n} {list(s)}" for n, s in banks.items()))
    common_facts(ev, shapes)
    d = ev.dims.dim
    if "attn_bank" in banks:
        s = banks["attn_bank"]
        ev.dims.set("hdim", s[-1], f"attn_bank {list(s)}")
    if "qk_bank" in banks:
        s = banks["qk_bank"]
        hd = s[1] // 2
        ev.dims.set("head_dim", hd, f"qk_bank {list(s)} (groups of 2 x head_dim rows)")
        if d and d % hd == 0:
            ev.dims.set("heads", d // hd, f"model dim {d} / head_dim {hd} (these versions assert hdim == dim)")
    if "vo_bank" in banks:
        ev.dims.set("hdim", banks["vo_bank"][1], f"vo_bank {list(banks['vo_bank'])}")
    if "mlp_bank" in banks:
        s = banks["mlp_bank"]
        ev.dims.set("mlp_hidden", s[2], f"mlp_bank {list(s)}")
        real = ev.dims.layers
        if real is not None and s[0] > real:
            ev.reasons.append(f"mlp_bank has {s[0]} slots for {real} layers ({ev.dims.origins['layers']}): "
                              f"slot(s) {', '.join(map(str, range(real, s[0])))} are padding")
    if ev.dims.layers is None:
        ev.notes.append("the layer count is unknown (no x0_lambdas-like vector): splitting the banks needs "
                        "--target-config with num_hidden_layers")
    ev.reasons += prefix_reason(index)
    return ev


__all__ = ["NAME", "DESCRIBE", "TABLE", "ATTENTION", "OPTIMIZER_GROUPS", "detect"]
