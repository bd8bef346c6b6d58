"""safetensors: one file, or a directory of shards with or without an index.

Used to re-convert and to verify shardfix's own output. The index is built from the headers
alone (:func:`shardfix.io.st_header.read_header`, which validates them); tensors are read with
``safetensors.safe_open`` (mmap). In a shardfix output directory, tensors of the ``optimizer``
file set are optimizer state named ``state.<param>.<state>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open

from shardfix.errors import BadInputError
from shardfix.io.st_header import read_header
from shardfix.sources.base import ObjectEntry, SourceIndex, TensorEntry

NAME = "safetensors"
DESCRIBE = "a .safetensors file or a directory of them"


def detect(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".safetensors"
    if path.is_dir():
        return any(path.glob("*.safetensors"))
    return False


def open(path: Path, trust_pickle: bool = False) -> SafetensorsSource:  # noqa: A001
    """Open safetensors (``trust_pickle`` is accepted for a uniform registry and unused: no pickles here)."""
    return SafetensorsSource(path)


def shard_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("."))


#: Files beside safetensors that hold training state this reader does not take (optimizer, DCP records).
_UNREAD = (".pt", ".pth", ".bin", ".ckpt", ".distcp")


def _unread_checkpoint_files(path: Path) -> list[str]:
    """A warning naming the checkpoint files in a safetensors directory that no layout claimed.

    A directory such as ``model.safetensors`` + ``optimizer.pt`` that is not a recognised training-stack
    layout is read as plain safetensors: say loudly that the rest is not converted.
    """
    if not path.is_dir():
        return []
    unread = sorted(p.name for p in path.iterdir() if p.suffix in _UNREAD and not p.name.startswith("."))
    if not unread:
        return []
    shown = ", ".join(unread[:8]) + (f" and {len(unread) - 8} more" if len(unread) > 8 else "")
    return [f"{path}: read as plain safetensors; {shown} beside them is not converted (no training-stack layout "
            "matches this directory) -- if it holds optimizer state, convert a directory layout shardfix reads "
            "(see `shardfix inspect` for the list) or that file on its own"]


def _path_for(file: Path, name: str) -> tuple[str, ...]:
    if file.name.startswith("optimizer") and name.startswith("state."):
        rest = name[len("state.") :]
        param, _, state = rest.rpartition(".")
        return ("optim", "state", param, state)
    return (name,)


class SafetensorsSource:
    format: ClassVar[str] = NAME

    def __init__(self, path: Path) -> None:
        self.path = path
        files = shard_files(path)
        if not files:
            raise BadInputError(f"{path}: no .safetensors files")
        entries: list[TensorEntry | ObjectEntry] = []
        self._where: dict[str, Path] = {}
        for f in files:
            for name, info in read_header(f).tensors.items():
                if name in self._where:
                    raise BadInputError(f"{path}: tensor {name} appears in {self._where[name].name} and {f.name}")
                self._where[name] = f
                entries.append(TensorEntry(name, _path_for(f, name), info.dtype, info.shape))
        self.index = SourceIndex(path, NAME, files, sum(f.stat().st_size for f in files), entries,
                                 warnings=_unread_checkpoint_files(path))
        self._handles: dict[Path, Any] = {}

    def read_tensor(self, key: str) -> torch.Tensor:
        f = self._where.get(key)
        if f is None:
            raise BadInputError(f"{self.path}: no tensor {key!r}")
        h = self._handles.get(f)
        if h is None:
            h = self._handles[f] = safe_open(str(f), framework="pt")
        return h.get_tensor(key)

    def close(self) -> None:
        self._handles.clear()
