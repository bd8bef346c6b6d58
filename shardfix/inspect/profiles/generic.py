"""Any checkpoint: no fused tensors known, names kept. Always matches, with the lowest score."""

from __future__ import annotations

from shardfix.inspect.profiles.base import Evidence, basic_dims, model_shapes, prefix_reason
from shardfix.sources.base import SourceIndex

NAME = "generic"
DESCRIBE = "any state dict: names kept, no fused tensors known (use --key-map to split or rename)"
TABLE = ()
ATTENTION = ()


def detect(index: SourceIndex) -> Evidence:
    shapes = model_shapes(index)
    ev = Evidence(NAME, score=1, variant="generic", describe="no profile-specific names")
    ev.reasons.append("fallback: no names of a more specific profile were found")
    basic_dims(ev, shapes)
    ev.reasons += prefix_reason(index)
    return ev


__all__ = ["NAME", "DESCRIBE", "TABLE", "ATTENTION", "detect"]
