"""Input formats, one module each, found through a registry.

Each format module defines ``NAME``, a pure ``detect(path) -> bool`` and ``open(path) ->
Source``. :func:`open_source` tries them in registry order (the most specific first) unless a
format is named.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shardfix.errors import BadInputError
from shardfix.sources import dcp, megatron, safetensors_src, torchranks, torchsave
from shardfix.sources.base import Chunk, ObjectEntry, Source, SourceIndex, TensorEntry

__all__ = [
    "Chunk",
    "ObjectEntry",
    "Source",
    "SourceIndex",
    "TensorEntry",
    "FORMATS",
    "detect_format",
    "open_source",
]


@dataclass(frozen=True, slots=True)
class SourceFormat:
    name: str
    detect: Callable[[Path], bool]
    open: Callable[..., Source]
    describe: str


FORMATS: dict[str, SourceFormat] = {
    m.NAME: SourceFormat(m.NAME, m.detect, m.open, m.DESCRIBE) for m in (megatron, dcp, torchranks, safetensors_src, torchsave)
}


def detect_format(path: str | Path) -> str:
    """Return the name of the format that recognises ``path``.

    Raises:
        BadInputError: the path does not exist or no format recognises it.
    """
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"{p}: no such file or directory; pass the checkpoint's path")
    for fmt in FORMATS.values():
        if fmt.detect(p):
            return fmt.name
    kinds = "; ".join(f"{f.name}: {f.describe}" for f in FORMATS.values())
    raise BadInputError(f"{p}: not a checkpoint shardfix can read (expected {kinds})")


def open_source(path: str | Path, format: str | None = None, *, trust_pickle: bool = False) -> Source:
    """Open a checkpoint, detecting its format unless ``format`` names one.

    Args:
        path: the checkpoint file or directory.
        format: a name from :data:`FORMATS`, or None to detect.
        trust_pickle: let torch.save files be fully unpickled (runs code in the file).
    """
    name = format or detect_format(path)
    if name not in FORMATS:
        raise BadInputError(f"unknown source format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name].open(Path(path), trust_pickle=trust_pickle)
