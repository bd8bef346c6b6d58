"""Hugging Face transformers-style state dicts (``model.layers.{i}.self_attn.q_proj.weight`` ...).

Names are already the target's; the split table covers the fused projections some models keep:
``qkv_proj`` (Phi-3 style, ``[(heads + 2 kv_heads) * head_dim, hidden]``, cut with the config's
head counts) and ``gate_up_proj`` (two equal halves). A ``config.json`` next to the checkpoint
supplies heads and head_dim for ``inspect``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shardfix.inspect.profiles.base import Evidence, basic_dims, matching, model_shapes, prefix_reason
from shardfix.reconcile.arch import head_candidates
from shardfix.reconcile.fused import SplitRule
from shardfix.sources.base import SourceIndex

NAME = "hf"
DESCRIBE = "Hugging Face transformers state dict (model.layers.{i}.self_attn.*_proj), optionally with config.json"

_ATTN = r"(model\.)?layers\.\d+\.self_attn\.(q|k|v|o)_proj\.weight"

TABLE = (
    SplitRule("model.layers.{i}.self_attn.qkv_proj.weight", "hf_qkv",
              ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
               "model.layers.{i}.self_attn.v_proj.weight")),
    SplitRule("model.layers.{i}.mlp.gate_up_proj.weight", "halves",
              ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight")),
)
ATTENTION = ()


def sibling_config(path: Path) -> tuple[dict[str, Any], Path] | None:
    """The ``config.json`` in a checkpoint directory (or next to a checkpoint file), if readable."""
    where = path if path.is_dir() else path.parent
    p = where / "config.json"
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return (data, p) if isinstance(data, dict) else None


def detect(index: SourceIndex) -> Evidence:
    shapes = model_shapes(index)
    attn = matching(shapes, _ATTN)
    fused = matching(shapes, r"(model\.)?layers\.\d+\.self_attn\.qkv_proj\.weight")
    gpt2 = matching(shapes, r"(transformer\.)?h\.\d+\.attn\.c_attn\.weight")
    ev = Evidence(NAME)
    if not (attn or fused or gpt2 or "model.embed_tokens.weight" in shapes):
        return ev
    ev.score = 60
    if fused:
        ev.variant, ev.describe = "fused-qkv", "q, k, v fused in self_attn.qkv_proj (Phi-3 style)"
    elif gpt2:
        ev.variant, ev.describe = "gpt2", "GPT-2 style transformer.h.{i}.attn.c_attn (Conv1D, [in, out])"
    else:
        ev.variant, ev.describe = "separate-qkvo", "separate q_proj / k_proj / v_proj / o_proj"
    found = attn or fused or gpt2
    if found:
        n, s = next(iter(found.items()))
        ev.reasons.append(f"{len(found)} transformers-style attention weights, e.g. {n} {list(s)}")
    emb = basic_dims(ev, shapes)
    if emb:
        ev.reasons.append(f"embedding {emb[0]} {list(emb[1])}")
    q = next((s for n, s in shapes.items() if n.endswith("self_attn.q_proj.weight")), None)
    k = next((s for n, s in shapes.items() if n.endswith("self_attn.k_proj.weight")), None)
    if q:
        ev.dims.set("hdim", q[0], f"q_proj {list(q)}")
        if k and k[0] != q[0]:
            ev.reasons.append(f"k_proj has {k[0]} rows vs q_proj {q[0]}: grouped-query attention "
                              f"({q[0] // k[0] if q[0] % k[0] == 0 else '?'} query heads per kv head)")
    rope = next((s for n, s in shapes.items() if n.endswith("rotary_emb.inv_freq")), None)
    if rope:
        ev.dims.set("head_dim", 2 * rope[0], f"rotary_emb.inv_freq {list(rope)}")
    if q and ev.dims.head_dim:
        ev.dims.set("heads", q[0] // ev.dims.head_dim, "q_proj rows / head_dim")
        if k:
            ev.dims.set("kv_heads", k[0] // ev.dims.head_dim, "k_proj rows / head_dim")
    elif q:
        ev.notes.append(f"heads from shapes alone are ambiguous; candidates {head_candidates(q[0], k[0] if k else None)[:3]}")
    mlp = next((s for n, s in shapes.items() if n.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight"))), None)
    if mlp:
        ev.dims.set("mlp_hidden", mlp[0], "mlp.gate_proj / up_proj rows")
    ev.reasons += prefix_reason(index)
    return ev


#: Parameter names in the order each architecture declares its modules (``{i}``: a layer index),
#: by ``config.json``'s ``model_type``. ``named_parameters()`` follows it; safetensors files do not
#: (their header is sorted by name), so naming integer-keyed optimizer state needs it.
_LLAMA = (
    "model.embed_tokens.weight",
    *(f"model.layers.{{i}}.self_attn.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")),
    *(f"model.layers.{{i}}.mlp.{p}_proj.{w}" for p in ("gate", "up", "down") for w in ("weight", "bias")),
    "model.layers.{i}.input_layernorm.weight", "model.layers.{i}.post_attention_layernorm.weight",
    "model.norm.weight", "lm_head.weight",
)
_GPT2 = (
    "transformer.wte.weight", "transformer.wpe.weight",
    *(f"transformer.h.{{i}}.{m}.{w}" for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
      for w in ("weight", "bias")),
    "transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight",
)
MODULE_ORDER: dict[str, tuple[str, ...]] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "gpt2": _GPT2}

#: The transformers Trainer's AdamW groups: weight-decay parameters, then the no-decay ones
#: (biases and norm weights, by the name patterns the Trainer uses).
OPTIMIZER_GROUPS = (("no-decay", r"bias|layernorm|rmsnorm|(^|\.)norm($|\.)|_norm($|\.)|(^|\.)ln_"),)


def declared_order(config: dict[str, Any]) -> tuple[str, tuple[str, ...]] | None:
    """(architecture, parameter-name templates in declaration order) for a known ``config.json``, or None."""
    kind = config.get("model_type")
    order = MODULE_ORDER.get(kind) if isinstance(kind, str) else None
    if order is None:
        return None
    arch = config.get("architectures")
    return (arch[0] if isinstance(arch, list) and arch else str(kind)), order


__all__ = ["NAME", "DESCRIBE", "TABLE", "ATTENTION", "MODULE_ORDER", "OPTIMIZER_GROUPS", "declared_order", "detect",
           "sibling_config"]
