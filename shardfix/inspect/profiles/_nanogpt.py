"""Facts shared by the modded-nanogpt profiles (docs/formats/core.md): model dim, layers, MLP width, lm_head.

All from names and shapes: the model dim is the embedding's width; layers are the
``blocks.{i}`` indices or, for the 2026 banks (no per-layer modules), the length of a per-layer
vector such as ``x0_lambdas``.
"""

from __future__ import annotations

from shardfix.inspect.profiles.base import Evidence, basic_dims, matching
from shardfix.reconcile.arch import AttnRule

#: per-layer parameter vectors of the bank versions: their first dim is the layer count.
PER_LAYER = ("x0_lambdas", "resid_lambdas", "post_lambdas", "bigram_lambdas")

#: The scripts' Adam groups (docs/formats/core.md): the head, the embeddings (token and value
#: embeddings), the scalars; the hidden matrices go to Muon. Each param group holds one class.
OPTIMIZER_GROUPS = (
    ("head", r"(^|\.)lm_head"),
    ("embeddings", r"embed"),
    ("scalars", r"(^|\.)(scalars|skip_weights|[a-z0-9_]*lambdas?)$"),
)

#: the fused attention tensors of every modded-nanogpt version, for the architecture check.
ATTENTION = (
    AttnRule(r"(^|\.)attn\.qkv_w$", "qkv"),
    AttnRule(r"(^|\.)attn\.qkvo_w$", "qkvo"),
    AttnRule(r"^attn_bank$", "attn_bank"),
    AttnRule(r"^qk_bank$", "qk_bank"),
    AttnRule(r"^vo_bank$", "vo_bank"),
)


def common_facts(ev: Evidence, shapes: dict[str, tuple[int, ...]]) -> None:
    """Fill ``ev.dims`` (dim, layers, heads from gates) and reasons about the embedding and lm_head."""
    basic_dims(ev, shapes)
    for name in PER_LAYER:
        if name in shapes and shapes[name]:
            ev.dims.set("layers", shapes[name][0], f"{name} {list(shapes[name])}")
    # attention gates are Linear(12, heads): [heads, 12] per layer, or banked [n, heads, 12]
    for name, shape in shapes.items():
        if (name.endswith("attn_gate.weight") and len(shape) == 2) or (name.endswith("gate_bank") and len(shape) == 3):
            ev.dims.set("heads", shape[-2], f"{name} {list(shape)} (one gate per head)")
    d = ev.dims.dim
    for name in ("lm_head.weight", "lm_head_w"):
        s = shapes.get(name)
        if s and len(s) == 2 and d:
            if s[1] == d and s[0] != d:
                ev.reasons.append(f"{name} {list(s)}: [vocab, dim]")
            elif s[0] == d:
                ev.reasons.append(f"{name} {list(s)}: stored transposed [dim, vocab]")


def mlp_hidden(ev: Evidence, shapes: dict[str, tuple[int, ...]], pattern: str) -> None:
    """The MLP width: the dim of the first MLP weight that is not the model dim."""
    d = ev.dims.dim
    for name, shape in matching(shapes, pattern).items():
        other = [x for x in shape[-2:] if x != d]
        if other:
            ev.dims.set("mlp_hidden", other[0], f"{name} {list(shape)}")
            return
