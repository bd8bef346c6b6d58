"""Byte counts for people: the one formatter (``parse_size`` for flags lives in ``shardfix.options``)."""

from __future__ import annotations


def format_bytes(n: float, decimals: int = 2) -> str:
    """``n`` bytes in decimal units: ``"512 B"``, ``"1.50 MB"``, ``"2.10 TB"`` (TB is the largest unit).

    Args:
        n: a byte count (may be negative or fractional).
        decimals: digits after the point for KB and larger; bytes are always whole.
    """
    if abs(n) < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if abs(n) < 1000:
            return f"{n:.{decimals}f} {unit}"
    return f"{n / 1000:.{decimals}f} TB"
