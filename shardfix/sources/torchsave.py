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
#: Containers nested deeper than this are refused (state dicts nest a handful of levels).
MAX_DEPTH = 1000
#: Containers and leaves flattened at most (a reused memoised container could otherwise be visited endlessly).
MAX_NODES = 20_000_000
#: Compressed zip members may declare at most ``factor * file size + slack`` bytes.
MAX_INFLATE_FACTOR, MAX_INFLATE_SLACK = 4, 64 << 20


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
    size = check_regular(path).st_size
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise BadInputError(f"{path}: cannot read ({e.strerror})") from e
    if is_zip:
        _check_members(path, size)
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


def _check_members(path: Path, size: int) -> None:
    """Refuse a zip whose members declare far more bytes than the file holds (torch.save stores, never deflates).

    torch's reader inflates a compressed member into a buffer of its declared size, so a 2 MB file
    whose ``data.pkl`` is deflated from 2 GiB would cost 2 GiB before a single check ran.
    """
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise BadInputError(f"{path}: not a readable torch.save file ({str(e)[:200]})") from e
    declared = sum(i.file_size for i in infos if i.compress_type != zipfile.ZIP_STORED)
    if declared > MAX_INFLATE_FACTOR * size + MAX_INFLATE_SLACK:
        raise BadInputError(f"{path}: its compressed members expand to {declared:,} bytes from a {size:,}-byte file; "
                            "torch.save never compresses, so the file is crafted or was re-zipped -- not read")


def _flatten(obj: Any, path: tuple[PathPart, ...], out: list[TensorEntry | ObjectEntry], origin: Path | None = None) -> None:
    """Flatten nested containers to entries, at most :data:`MAX_DEPTH` deep and ``MAX_NODES`` containers and leaves.

    Iterative: a crafted 5000-deep dict is one message, not a ``RecursionError``; the node budget
    stops a pickle that references one memoised container from everywhere.
    """
    stack: list[tuple[Any, tuple[PathPart, ...]]] = [(obj, path)]
    budget = MAX_NODES
    while stack:
        budget -= 1
        if budget < 0:
            raise BadInputError(f"{origin}: holds over {MAX_NODES:,} entries (containers reused over and over); "
                                "it is crafted or not a checkpoint")
        item, p = stack.pop()
        if len(p) > MAX_DEPTH:
            raise BadInputError(f"{origin}: containers nested over {MAX_DEPTH} levels deep (at "
                                f"{join_key(p[:5])}...); no checkpoint is nested like that")
        children = _flatten_one(item, p, out)
        stack.extend(reversed(children))


def _flatten_one(obj: Any, path: tuple[PathPart, ...], out: list[TensorEntry | ObjectEntry]) -> list[tuple[Any, tuple]]:
    """Add ``obj`` as an entry, or return its children to flatten (in order)."""
    if isinstance(obj, torch.Tensor):
        key = join_key(path)
        if obj.layout == torch.sparse_coo:
            out.append(TensorEntry(key, path, st_name(obj.dtype), tuple(obj.shape), (), None, "sparse_coo"))
            return []
        if obj.layout != torch.strided:
            out.append(ObjectEntry(key, path, None, f"tensor with layout {obj.layout}"))
            return []
        out.append(TensorEntry(key, path, st_name(obj.dtype), tuple(obj.shape), (), tuple(obj.stride())))
        return []
    if isinstance(obj, dict) and obj:
        return [(v, (*path, k)) for k, v in obj.items()]
    if isinstance(obj, (list, tuple)) and obj and any(isinstance(v, (torch.Tensor, dict)) for v in obj):
        return [(v, (*path, i)) for i, v in enumerate(obj)]
    out.append(ObjectEntry(join_key(path), path, obj, type(obj).__name__))
    return []


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
        _flatten(self._obj, (), entries, path)
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
