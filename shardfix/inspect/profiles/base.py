"""What a profile is: a pure ``detect(index) -> Evidence`` plus a declarative split table.

Detection reads names and shapes only (never dates, never tensor data). :class:`Evidence`
carries a score (0: not this profile), the variant, the reasons that decided it, and the
architecture facts the shapes give (:class:`~shardfix.reconcile.arch.Dims`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from shardfix.reconcile.arch import AttnRule, Dims
from shardfix.reconcile.fused import SplitRule
from shardfix.reconcile.keys import WRAPPERS, classify, is_flat_model, strip_wrappers
from shardfix.sources.base import SourceIndex

_LAYER = re.compile(r"(?:^|\.)(?:blocks|layers|h|layer)\.(\d+)\.")
_EMBED = re.compile(r"(?:^|\.)(?:embed|wte|tok_embeddings|word_embeddings|embed_tokens)(?:\.weight)?$")


@dataclass(slots=True)
class Evidence:
    """One profile's verdict on a checkpoint."""

    profile: str
    score: int = 0
    variant: str | None = None
    describe: str = ""
    reasons: list[str] = field(default_factory=list)
    dims: Dims = field(default_factory=Dims)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "score": self.score, "variant": self.variant, "describe": self.describe,
                "reasons": list(self.reasons), "dims": self.dims.to_dict(), "notes": list(self.notes)}


@dataclass(frozen=True, slots=True)
class Profile:
    """A registry entry: the module's ``NAME``, ``DESCRIBE``, ``detect``, ``TABLE``, ``ATTENTION``."""

    name: str
    describe: str
    detect: Callable[[SourceIndex], Evidence]
    table: tuple[SplitRule, ...] = ()
    attention: tuple[AttnRule, ...] = ()
    #: apply ``table`` without ``--split-fused`` (its splits are needed for the model's own names)
    split_always: bool = False
    #: the training script's optimizer grouping, ``(class, regex)``: each param group holds one class
    optimizer_groups: tuple[tuple[str, str], ...] = ()


def model_shapes(index: SourceIndex) -> dict[str, tuple[int, ...]]:
    """The model's tensors by name after prefix stripping, in key order (metadata only)."""
    tensors = list(index.tensors())
    flat = is_flat_model([e.path for e in index.entries], [e.path for e in tensors])
    out: dict[str, tuple[int, ...]] = {}
    for e in tensors:
        role = classify(e.path, flat)
        if role.kind == "model":
            out.setdefault(strip_wrappers(role.name)[0], tuple(e.shape))
    return out


def wrapper_counts(index: SourceIndex) -> dict[str, int]:
    """How many tensor keys carry each wrapper component (``_orig_mod.``: a compiled module was saved)."""
    counts: dict[str, int] = {}
    for e in index.tensors():
        for part in ".".join(map(str, e.path)).split("."):
            if part in WRAPPERS:
                counts[part + "."] = counts.get(part + ".", 0) + 1
    return counts


def layer_ids(names: Iterable[str]) -> list[int]:
    """Distinct layer indices in names like ``blocks.3.``, ``model.layers.3.``, ``h.3.``."""
    return sorted({int(m.group(1)) for n in names if (m := _LAYER.search(n))})


def matching(shapes: dict[str, tuple[int, ...]], pattern: str) -> dict[str, tuple[int, ...]]:
    """The tensors whose whole name matches ``pattern`` (a regex)."""
    rx = re.compile(pattern)
    return {n: s for n, s in shapes.items() if rx.fullmatch(n)}


def embedding(shapes: dict[str, tuple[int, ...]]) -> tuple[str, tuple[int, ...]] | None:
    """The token embedding ``[vocab, dim]``, when there is one."""
    return next(((n, s) for n, s in shapes.items() if _EMBED.search(n) and len(s) == 2), None)


def basic_dims(ev: Evidence, shapes: dict[str, tuple[int, ...]]) -> tuple[str, tuple[int, ...]] | None:
    """Set the model dim (the embedding's width) and the layer count (``layers.{i}`` indices) on
    ``ev.dims``; return the embedding."""
    emb = embedding(shapes)
    if emb:
        ev.dims.set("dim", emb[1][1], f"{emb[0]} {list(emb[1])}")
    ids = layer_ids(shapes)
    if ids:
        ev.dims.set("layers", len(ids), f"layer indices 0..{ids[-1]}")
    return emb


def prefix_reason(index: SourceIndex) -> list[str]:
    counts = wrapper_counts(index)
    return [f"{n} keys carry the {w} wrapper prefix" + (" (a torch.compile'd module was saved)" if w == "_orig_mod." else "")
            for w, n in counts.items()]
