"""What an output directory looks like: layouts (file names, index files, sidecars), the streaming
safetensors writer (``writer``), and reading an output back (``restore``).

Adding a layout is one module defining ``NAME`` and ``LAYOUT`` (an :class:`OutputLayout`) plus one
line in :data:`LAYOUTS`. May import: ``io``, ``sources.base`` (byte ranges), ``errors``, ``dtypes``.
"""

from __future__ import annotations

from shardfix.errors import BadInputError
from shardfix.outputs import hf
from shardfix.outputs.layout import COMPANIONS, MODEL, OPTIMIZER, REPORT_NAME, SETS, STAGING, OutputLayout

__all__ = ["COMPANIONS", "LAYOUTS", "MODEL", "OPTIMIZER", "REPORT_NAME", "SETS", "STAGING", "OutputLayout",
           "get_layout"]

LAYOUTS: dict[str, OutputLayout] = {m.NAME: m.LAYOUT for m in (hf,)}
DEFAULT_LAYOUT = hf.NAME


def get_layout(name: str = DEFAULT_LAYOUT) -> OutputLayout:
    """The registered layout called ``name``."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise BadInputError(f"unknown output layout {name!r}; known: {', '.join(LAYOUTS)}") from None
