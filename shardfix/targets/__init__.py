"""Target shapes: what the reconciled checkpoint must look like, from the user's sources.

Each source (``--vocab-size``, ``--tokenizer``, ``--target-config``, ``--target-shapes``,
``--target-model``) contributes facts with its origin; facts that disagree are an error that
lists both origins. The planner treats the merged result as the truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Targets:
    """Merged target facts. ``shapes`` maps normalised names to shapes."""

    vocab: int | None = None
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: True when ``shapes`` lists every tensor of the target model (``--target-model``).
    complete: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "vocab": self.vocab,
            "shapes": len(self.shapes),
            "complete": self.complete,
            "config": self.config,
            "origins": self.origins,
        }
