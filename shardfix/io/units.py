"""Byte counts in words (decimal units, as disks and the README's tables count them)."""

from __future__ import annotations


def format_bytes(n: float, digits: int = 1) -> str:
    """``1234567`` -> ``"1.2 MB"`` (``digits`` decimals above bytes)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1000
    return f"{n:.{digits}f} TB"
