"""Read target facts from the user's sources and merge them (conflicts listed together)."""

from __future__ import annotations

import json
from pathlib import Path

from shardfix.errors import BadInputError, ReconcileConflictError
from shardfix.options import ConvertOptions
from shardfix.targets import Targets


def read_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """``--target-shapes``: ``{"name": [dims], ...}``."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise BadInputError(f"--target-shapes: cannot read {p} ({e.strerror})") from e
    except ValueError as e:
        raise BadInputError(f"--target-shapes: {p} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise BadInputError(f'--target-shapes: {p} must hold an object {{"name": [dims], ...}}')
    out = {}
    for k, v in data.items():
        if not isinstance(v, list) or not all(isinstance(d, int) and d >= 0 for d in v):
            raise BadInputError(f"--target-shapes: {p}: {k!r} must map to a list of non-negative ints, got {v!r}")
        out[k] = tuple(v)
    return out


def merge_targets(opts: ConvertOptions) -> Targets:
    t = Targets()
    if opts.vocab_size is not None:
        t.vocab = opts.vocab_size
        t.origins["vocab"] = f"--vocab-size {opts.vocab_size}"
    if opts.target_shapes:
        t.shapes.update(read_shapes(opts.target_shapes))
        t.origins["shapes"] = f"--target-shapes {opts.target_shapes}"
    problems: list[str] = []
    if problems:
        raise ReconcileConflictError(problems)
    return t
