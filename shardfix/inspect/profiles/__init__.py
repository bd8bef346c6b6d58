"""Checkpoint profiles: which training script's layout a checkpoint has, found through a registry.

Each profile module defines ``NAME``, ``DESCRIBE``, a pure ``detect(index) -> Evidence`` (names
and shapes only), a declarative split ``TABLE`` (:class:`~shardfix.reconcile.fused.SplitRule`)
and the ``ATTENTION`` tensors the architecture check knows it by. :func:`detect_profile` runs
every ``detect`` and keeps the highest score (registry order breaks ties) unless ``--profile``
names one; adding a layout touches one file and the tuple below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shardfix.errors import BadInputError
from shardfix.inspect.profiles import generic, hf, megatron, nanogpt_banks, nanogpt_medium, nanogpt_qkv, nanogpt_qkvo
from shardfix.inspect.profiles.base import Evidence, Profile
from shardfix.reconcile.arch import ArchConfig, arch_config
from shardfix.reconcile.fused import Splitter
from shardfix.sources.base import SourceIndex
from shardfix.targets.rules_files import read_key_map

__all__ = ["PROFILES", "Detection", "Evidence", "Profile", "detect_profile", "splitter_for", "target_config"]

PROFILES: dict[str, Profile] = {
    m.NAME: Profile(m.NAME, m.DESCRIBE, m.detect, tuple(m.TABLE), tuple(m.ATTENTION), getattr(m, "SPLIT_ALWAYS", False),
               tuple(getattr(m, "OPTIMIZER_GROUPS", ())))
    for m in (megatron, nanogpt_banks, nanogpt_medium, nanogpt_qkvo, nanogpt_qkv, hf, generic)
}


@dataclass(slots=True)
class Detection:
    """The active profile, the evidence that decided it, and every other profile that matched."""

    profile: Profile
    evidence: Evidence
    chosen_by: str
    others: list[Evidence] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.profile.name, "variant": self.evidence.variant, "describe": self.evidence.describe,
                "chosen_by": self.chosen_by, "score": self.evidence.score, "evidence": list(self.evidence.reasons),
                "notes": list(self.evidence.notes),
                "also_matched": [{"name": e.profile, "score": e.score, "variant": e.variant} for e in self.others]}


def detect_profile(index: SourceIndex, name: str | None = None) -> Detection:
    """Run every profile's ``detect``; ``name`` (``--profile``) overrides the choice.

    Raises:
        BadInputError: ``name`` is not a registered profile.
    """
    if name is not None and name not in PROFILES:
        raise BadInputError(f"--profile {name!r}: unknown profile; known: {', '.join(PROFILES)}")
    found = [p.detect(index) for p in PROFILES.values()]
    if name is not None:
        ev = next(e for e in found if e.profile == name)
        if ev.score == 0:
            ev.notes.append(f"none of {name}'s names were found in the checkpoint; its rules apply only where they match")
        chosen_by = "--profile"
    else:
        ev = max(found, key=lambda e: e.score)  # max keeps the first of equal scores: registry order
        chosen_by = "detection"
    others = sorted((e for e in found if e is not ev and e.score > 0), key=lambda e: -e.score)
    return Detection(PROFILES[ev.profile], ev, chosen_by, others)


def target_config(targets: Any, opts: Any) -> tuple[ArchConfig | None, list[str]]:
    """The config the architecture check compares with: ``targets.config`` (``--target-config``,
    read by the target sources) or, when a caller built no targets, the file itself."""
    data = getattr(targets, "config", None) or {}
    origin = (getattr(targets, "origins", None) or {}).get("config")
    path = getattr(opts, "target_config", None)
    if not data and path:
        from shardfix.targets.files import read_config

        data = read_config(path)
    if not data:
        return None, []
    return arch_config(data, origin or f"--target-config {path}")


def splitter_for(index: SourceIndex, opts: Any, targets: Any = None, detection: Detection | None = None) -> Splitter:
    """Everything the planner's fused-weight hook and architecture check need, decided once."""
    det = detection or detect_profile(index, getattr(opts, "profile", None))
    cfg, cfg_problems = target_config(targets, opts)
    dims = det.evidence.dims.with_config(cfg)
    if cfg is None:
        sibling = hf.sibling_config(index.path)
        if sibling is not None:
            dims = dims.with_config(arch_config(sibling[0], f"{sibling[1]}")[0])
    key_map = read_key_map(opts.key_map) if getattr(opts, "key_map", None) else None
    split = bool(getattr(opts, "split_fused", False)) or det.profile.split_always
    return Splitter(det.profile.name, det.profile.table, det.profile.attention, dims, key_map,
                    split, cfg, cfg_problems, det.to_dict() | {"dims": dims.to_dict()})
