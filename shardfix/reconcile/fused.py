"""Fused-weight rules: split ``qkv_w`` / ``qkvo_w`` / banks into the target model's tensors.

:func:`split_parts` is the planner's hook: given a tensor's (already shape-reconciled) name and
shape it returns the parts to write, in order, so they concatenate back to the source, or None
when the tensor is not fused, or a problem string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Part:
    """One output made from a source tensor: its name, the ops after the shape fix, actions."""

    name: str
    ops: list[dict[str, Any]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)


def split_parts(name: str, shape: tuple[int, ...], opts: Any, targets: Any) -> list[Part] | str | None:
    """Parts for a fused tensor, None when ``name`` is not fused under the active profile."""
    return None
