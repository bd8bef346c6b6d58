"""An allowlist unpickler for DCP ``.metadata`` files.

Torch 2.13 loads ``.metadata`` with a raw ``pickle.load``, so a crafted file runs code. shardfix
never does that: only the classes a genuine metadata pickle references (listed in FORMATS.md)
may be looked up; every other global -- ``os.system``, ``builtins.eval``, ``subprocess`` --
is refused before anything is called. Files above :data:`MAX_METADATA_BYTES` are refused too.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from typing import Any

import torch

from shardfix.errors import BadInputError, UnsafeInputError

MAX_METADATA_BYTES = 1 << 30

_DCP_MD = "torch.distributed.checkpoint.metadata"
_ALLOWED_NAMES: dict[str, frozenset[str]] = {
    _DCP_MD: frozenset(
        {
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.distributed._shard.sharded_tensor.metadata": frozenset(
        {"TensorProperties", "MEM_FORMAT_ENCODING"}
    ),
    "torch.serialization": frozenset({"_get_layout"}),
    "pathlib": frozenset({"PosixPath", "WindowsPath", "PurePosixPath", "Path"}),
    "collections": frozenset({"OrderedDict"}),
}


def _resolve(module: str, name: str) -> Any:
    if module == "torch":
        if name == "Size":
            return torch.Size
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            return value
        return None
    if name not in _ALLOWED_NAMES.get(module, ()):
        return None
    if module == "pathlib":
        return getattr(pathlib, name)
    if module == "collections":
        import collections

        return collections.OrderedDict
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    return getattr(mod, name, None)


class _AllowlistUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, origin: str) -> None:
        super().__init__(file)
        self._origin = origin

    def find_class(self, module: str, name: str) -> Any:
        value = _resolve(module, name)
        if value is None:
            raise UnsafeInputError(
                f"{self._origin}: refuses to load global {module}.{name}: a DCP .metadata file "
                "only references torch's checkpoint metadata classes, so this file is not a "
                "genuine checkpoint (or was crafted to run code). It was not executed."
            )
        return value

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeInputError(f"{self._origin}: unexpected persistent id in a metadata pickle")


def load_metadata_pickle(path: pathlib.Path) -> Any:
    """Unpickle a DCP ``.metadata`` file allowing only the documented metadata classes.

    Raises:
        UnsafeInputError: the pickle references any other global.
        BadInputError: the file is too large, truncated or not a pickle.
    """
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BadInputError(f"{path}: cannot read ({e.strerror})") from e
    if size > MAX_METADATA_BYTES:
        raise BadInputError(
            f"{path}: {size} bytes is far larger than any DCP metadata file; refusing to load it"
        )
    data = path.read_bytes()
    try:
        return _AllowlistUnpickler(io.BytesIO(data), str(path)).load()
    except UnsafeInputError:
        raise
    except RecursionError as e:
        raise BadInputError(f"{path}: metadata pickle is nested too deeply to be genuine") from e
    except MemoryError as e:
        raise BadInputError(f"{path}: metadata pickle is too large to load") from e
    except Exception as e:  # pickle raises many types on corrupt input
        raise BadInputError(
            f"{path}: not a readable DCP metadata pickle ({type(e).__name__}: {e}); "
            "the file is truncated or corrupt -- copy the checkpoint again"
        ) from e
