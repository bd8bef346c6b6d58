"""``torch.save`` files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``): nested dicts and lists of tensors.

Loaded with ``torch.load(mmap=True, weights_only=True, map_location="cpu")``: nothing is
executed, and tensor bytes stay on disk until a task touches them. Nested containers are
flattened to dotted keys with the keys exactly as saved (``model._orig_mod.embed.weight``,
``optimizers.0.state.3.exp_avg``); the path tuple keeps keys that contain dots intact.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, ClassVar

import torch

from shardfix.dtypes import st_name
from shardfix.errors import BadInputError, UnsafeInputError
from shardfix.io.regular import check_regular
from shardfix.io.safe_pickle import is_weights_only_refusal, refused_global
from shardfix.sources.base import ObjectEntry, PathPart, SourceIndex, TensorEntry, join_key

NAME = "torch"
DESCRIBE = "a torch.save file (.pt, .pth, .bin, .ckpt)"
SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt", ".tar"})


def detect(path: Path) -> bool:
    """A file with a torch.save suffix, or any zip archive torch wrote (``*/data.pkl``)."""
    if not path.is_file():
        return False
    if path.suffix in SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            magic = f.read(4)
        if magic != b"PK\x03\x04":
            return False
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/data.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def open(path: Path, trust_pickle: bool = False) -> TorchSaveSource:  # noqa: A001
    return TorchSaveSource(path, trust_pickle=trust_pickle)


def load_torch_file(path: Path, trust_pickle: bool = False) -> tuple[Any, list[str]]:
    """Load a torch.save file lazily and safely; return the object and notes about how."""
    notes: list[str] = []
    check_regular(path)
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise BadInputError(f"{path}: cannot read ({e.strerror})") from e
    try:
        if trust_pickle:
            notes.append(f"--trust-pickle: {path} was read with full unpickling (weights_only=False), which runs "
                         "code stored in the file")
            return torch.load(path, map_location="cpu", weights_only=False, mmap=is_zip), notes
        if not is_zip:
            notes.append("legacy (non-zip) torch.save format: loaded into memory, not mmapped")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip), notes
    except pickle.UnpicklingError as e:
        if is_weights_only_refusal(e):
            raise UnsafeInputError(
                f"{path}: can only be read by full unpickling: it references {refused_global(e)}, which is not "
                "a tensor or a plain container. Full unpickling runs whatever code the file names (a crafted "
                "checkpoint can take over your account), so shardfix refused and nothing in the file ran. If "
                "you trust where this file came from, rerun with --trust-pickle"
            ) from None
        raise BadInputError(f"{path}: not a readable torch.save file ({str(e)[:300]})") from e
    except Exception as e:  # torch raises many types on truncated or corrupt files
        raise BadInputError(
            f"{path}: not a readable torch.save file ({type(e).__name__}: {str(e)[:300]}); it may be "
            "truncated -- copy it again"
        ) from e


def _flatten(obj: Any, path: tuple[PathPart, ...], out: list[TensorEntry | ObjectEntry]) -> None:
    if isinstance(obj, torch.Tensor):
        key = join_key(path)
        if obj.layout == torch.sparse_coo:
            out.append(TensorEntry(key, path, st_name(obj.dtype), tuple(obj.shape), (), None, "sparse_coo"))
            return
        if obj.layout != torch.strided:
            out.append(ObjectEntry(key, path, None, f"tensor with layout {obj.layout}"))
            return
        out.append(TensorEntry(key, path, st_name(obj.dtype), tuple(obj.shape), (), tuple(obj.stride())))
        return
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            _flatten(v, (*path, k), out)
        return
    if isinstance(obj, (list, tuple)) and obj and any(isinstance(v, (torch.Tensor, dict)) for v in obj):
        for i, v in enumerate(obj):
            _flatten(v, (*path, i), out)
        return
    out.append(ObjectEntry(join_key(path), path, obj, type(obj).__name__))


def _lookup(obj: Any, path: tuple[PathPart, ...]) -> Any:
    for part in path:
        obj = obj[part]
    return obj


class TorchSaveSource:
    """One torch.save file, loaded lazily (mmap) and safely (weights_only)."""

    format: ClassVar[str] = NAME

    def __init__(self, path: Path, trust_pickle: bool = False) -> None:
        self.path = path
        self._obj, notes = load_torch_file(path, trust_pickle)
        entries: list[TensorEntry | ObjectEntry] = []
        if isinstance(self._obj, torch.Tensor):
            raise BadInputError(f"{path}: holds a single tensor, not a state dict")
        _flatten(self._obj, (), entries)
        self._paths = {e.key: e.path for e in entries}
        self.index = SourceIndex(path, NAME, [path], path.stat().st_size, entries, notes)

    def read_tensor(self, key: str) -> torch.Tensor:
        try:
            value = _lookup(self._obj, self._paths[key])
        except (KeyError, IndexError, TypeError):
            raise BadInputError(f"{self.path}: no tensor {key!r}") from None
        if not isinstance(value, torch.Tensor):
            raise BadInputError(f"{self.path}: {key!r} is not a tensor")
        if value.layout == torch.sparse_coo:
            return value.to_dense()
        return value

    def close(self) -> None:
        self._obj = None


__all__ = ["TorchSaveSource", "detect", "open", "load_torch_file", "UnsafeInputError"]
