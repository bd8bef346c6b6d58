"""Text shardfix prints or writes: escaped for terminals, capped in length, strict JSON.

Key names, global names and file names come from the checkpoint, so they are data an attacker
may choose. Everything shardfix prints goes through :func:`printable` (the CLI's summaries, its
log lines via :class:`EscapingFormatter`, its error messages), which escapes C0/C1 control
characters (an ``ESC [`` sequence could rewrite the terminal), bidirectional overrides and lone
surrogates (which cannot even be encoded to UTF-8). Error messages are capped by
:func:`cap_message`, so a message built from a crafted input stays a line, not megabytes. Every
JSON document shardfix writes goes through :func:`strict_json` / :func:`strict_value`: ``NaN``
and ``Infinity`` are not JSON, so non-finite floats are written as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"``.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

_ESCAPES: dict[int, str] = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if chr(c) not in "\n\t"}
_ESCAPES.update({c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F)})
_ESCAPES.update({c: f"\\u{c:04x}" for c in range(0xD800, 0xE000)})  # lone surrogates

#: Longest error message printed, in characters (the head and tail are kept).
MAX_MESSAGE = 4000


def printable(text: str) -> str:
    """``text`` with control characters, bidi overrides and lone surrogates escaped as ``\\xNN`` / ``\\uNNNN``."""
    return text.translate(_ESCAPES)


def cap_message(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut to about ``limit`` characters, keeping its start and end and saying how much was left out."""
    if len(text) <= limit:
        return text
    keep = limit // 2
    return f"{text[:keep]} ... [{len(text) - 2 * keep:,} characters left out] ... {text[-keep:]}"


def strict_value(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, tuples, scalars) with non-finite floats as strings; other objects as is."""
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: strict_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_value(v) for v in obj]
    return obj


def strict_json(obj: Any, indent: int | None = 2) -> str:
    """``obj`` as strict JSON (no ``NaN``/``Infinity``; objects JSON does not know as ``str``)."""
    return json.dumps(strict_value(obj), indent=indent, default=str, allow_nan=False)


class EscapingFormatter(logging.Formatter):
    """A log formatter whose lines are :func:`printable` and capped (log messages name keys and files)."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(cap_message(super().format(record)))
