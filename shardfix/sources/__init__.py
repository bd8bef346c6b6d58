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
from shardfix.sources import dcp, deepspeed, hf_distributed, safetensors_src, torchranks, torchsave
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
    m.NAME: SourceFormat(m.NAME, m.detect, m.open, m.DESCRIBE)
    for m in (dcp, deepspeed, torchranks, hf_distributed, safetensors_src, torchsave)
}


def detect_format(path: str | Path) -> str:
    """Return the name of the format that recognises ``path``.

    Raises:
        BadInputError: the path does not exist or no format recognises it.
    """
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"{p}: no such file or directory; pass the checkpoint's path")
    from shardfix.layouts import REGISTRY, detect_layout  # training-stack directories first (they hold formats)

    if (layout := detect_layout(p)) is not None:
        return layout
    for fmt in FORMATS.values():
        if fmt.detect(p):
            return fmt.name
    kinds = "; ".join(f"{f.name}: {f.describe}" for f in [*REGISTRY.values(), *FORMATS.values()])
    found = sorted(c.name + ("/" if c.is_dir() else "") for c in p.iterdir())[:20] if p.is_dir() else []
    what = f"found {', '.join(found) or 'nothing'}; " if p.is_dir() else ""
    raise BadInputError(f"{p}: not a checkpoint shardfix can read ({what}shardfix reads {kinds})")


def open_source(path: str | Path, format: str | None = None, *, trust_pickle: bool = False) -> Source:
    """Open a checkpoint, detecting its format unless ``format`` names one.

    Args:
        path: the checkpoint file or directory.
        format: a name from :data:`FORMATS`, or None to detect.
        trust_pickle: let torch.save files be fully unpickled (runs code in the file).
    """
    from shardfix.layouts import REGISTRY

    name = format or detect_format(path)
    if name in REGISTRY:
        return REGISTRY[name].open(Path(path), trust_pickle=trust_pickle)
    if name not in FORMATS:
        raise BadInputError(f"unknown source format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name].open(Path(path), trust_pickle=trust_pickle)
