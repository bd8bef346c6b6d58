"""Input directory layouts of training stacks: one module per stack, found through a registry.

A *layout* turns a directory a training library wrote (Lightning, accelerate, the transformers
Trainer) into ONE logical checkpoint: it opens the model and optimizer files with the ordinary
format readers (:mod:`shardfix.sources`) and composes them into a
:class:`~shardfix.sources.composite.CompositeSource` whose entry paths the classifier
understands, listing the files it does not convert with the reason. Each module defines
``NAME``, ``DESCRIBE``, a pure ``detect(dir) -> bool`` (file names only, no reads beyond a
directory listing) and ``open(dir, trust_pickle) -> Source``. :mod:`shardfix.sources` consults
:data:`REGISTRY` before the plain formats, so adding a stack is one module and one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardfix.layouts import accelerate, lightning, trainer


@dataclass(frozen=True, slots=True)
class Layout:
    name: str
    detect: Callable[[Path], bool]
    open: Callable[..., Any]
    describe: str


#: Most specific first: a Lightning FSDP directory is also a DCP directory.
REGISTRY: dict[str, Layout] = {
    m.NAME: Layout(m.NAME, m.detect, m.open, m.DESCRIBE) for m in (lightning, accelerate, trainer)
}


def detect_layout(path: Path) -> str | None:
    """The name of the layout that recognises directory ``path``, or None."""
    if not path.is_dir():
        return None
    for layout in REGISTRY.values():
        if layout.detect(path):
            return layout.name
    return None
