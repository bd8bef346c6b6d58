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
from shardfix.sources import dcp, deepspeed, hf_distributed, megatron, safetensors_src, torchranks, torchsave
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
    for m in (megatron, dcp, deepspeed, torchranks, hf_distributed, safetensors_src, torchsave)
}


def detect_format(path: Path) -> str | None:
    """The name of the file format that recognises ``path``, or None (see :func:`shardfix.layouts.detect_checkpoint`)."""
    for fmt in FORMATS.values():
        if fmt.detect(path):
            return fmt.name
    return None


def open_source(path: str | Path, format: str | None = None, *, trust_pickle: bool = False) -> Source:
    """Open a checkpoint in one of the file formats of :data:`FORMATS`, detecting it unless ``format`` names one.

    Training-stack directories (a Trainer's ``checkpoint-N/``, ...) are opened by
    :func:`shardfix.layouts.open_checkpoint`, which also takes these formats.

    Args:
        path: the checkpoint file or directory.
        format: a name from :data:`FORMATS`, or None to detect.
        trust_pickle: let torch.save files be fully unpickled (runs code in the file).
    """
    p = Path(path)
    name = format or detect_format(p)
    if name is None or name not in FORMATS:
        raise BadInputError(f"{p}: not a checkpoint in a format shardfix reads ({', '.join(FORMATS)})"
                            if name is None else f"unknown source format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name].open(p, trust_pickle=trust_pickle)
