"""An allowlist unpickler for DCP ``.metadata`` files.

Torch 2.13 loads ``.metadata`` with a raw ``pickle.load``, so a crafted file runs code. shardfix
never does that: only the classes a genuine metadata pickle references (listed in docs/formats/core.md)
may be looked up; every other global -- ``os.system``, ``builtins.eval``, ``subprocess`` --
is refused before anything is called. Files above :data:`MAX_METADATA_BYTES` are refused too.

Refusing unknown globals is not enough on its own: pickle's ``BUILD`` opcode sets attributes
on whatever object is on the stack, so a pickle that looks up an *allowed* class or function
can still rewrite it for the whole process (``BUILD`` on ``pathlib.PosixPath`` with
``_str = "/home/you/.bashrc"`` would redirect every later file write). So the unpickler never
hands out a shared object with writable attributes:

* each metadata dataclass is looked up as a private subclass made for this one load
  (``NEWOBJ`` needs a real class; writing to the subclass touches nothing else);
* everything that is only ever called (``Enum`` lookups, ``pathlib`` paths, ``OrderedDict``,
  ``torch.Size``, ``_get_layout``) is a function made for this one load that returns a fresh or
  immutable object (a memory-format code is returned as a plain ``int``, never the shared enum
  member);
* ``torch`` dtypes and layouts are immutable singletons.
"""

from __future__ import annotations

import collections
import io
import pathlib
import pickle
import re
from collections.abc import Callable
from typing import Any

import torch

from shardfix.errors import BadInputError, UnsafeInputError
from shardfix.io.regular import check_regular

MAX_METADATA_BYTES = 1 << 30

_DCP_MD = "torch.distributed.checkpoint.metadata"
_SHARD_MD = "torch.distributed._shard.sharded_tensor.metadata"
_PLANNER = "torch.distributed.checkpoint.planner"

#: The dataclasses a genuine metadata pickle builds with ``NEWOBJ`` + ``BUILD``.
_CLASSES: dict[str, frozenset[str]] = {
    _DCP_MD: frozenset(
        {
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    # Megatron-core sets ``Metadata.all_local_plans``: every rank's save plan, kept as inert data
    _PLANNER: frozenset({"SavePlan", "WriteItem", "TensorWriteData"}),
    _SHARD_MD: frozenset({"TensorProperties"}),
}

_LAYOUTS: dict[str, torch.layout] = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
_MEMORY_FORMATS = {0: torch.contiguous_format, 1: torch.channels_last, 2: torch.preserve_format}


def _mem_format_code(value: Any) -> int:
    if type(value) is not int or value not in _MEMORY_FORMATS:
        raise ValueError(f"unknown memory-format code {value!r}")
    return value


def _write_item_type(value: Any) -> int:
    """``WriteItemType(v)`` in a save plan: the plain code (1 tensor, 2 shard, 3 bytes), never the enum member."""
    if type(value) is not int or value not in (1, 2, 3):
        raise ValueError(f"unknown WriteItemType code {value!r}")
    return value


def _layout(name: Any) -> torch.layout:
    if type(name) is not str or name not in _LAYOUTS:
        raise ValueError(f"unknown layout {name!r}")
    return _LAYOUTS[name]


def _path(*parts: Any) -> pathlib.PurePosixPath:
    if not all(type(p) is str for p in parts):
        raise ValueError("path parts must be strings")
    return pathlib.PurePosixPath(*parts)


def _size(dims: Any = ()) -> torch.Size:
    return torch.Size(dims)


def _ordered_dict(items: Any = ()) -> collections.OrderedDict:
    return collections.OrderedDict(items)


#: Globals that a genuine pickle only calls (``REDUCE``): each maps to a private function.
_CALLABLES: dict[tuple[str, str], Callable[..., Any]] = {
    (_DCP_MD, "_MEM_FORMAT_ENCODING"): _mem_format_code,
    (_SHARD_MD, "MEM_FORMAT_ENCODING"): _mem_format_code,
    (_PLANNER, "WriteItemType"): _write_item_type,
    ("torch.serialization", "_get_layout"): _layout,
    ("torch", "Size"): _size,
    ("collections", "OrderedDict"): _ordered_dict,
    **{("pathlib", n): _path for n in ("PosixPath", "PurePosixPath", "Path", "WindowsPath", "PureWindowsPath")},
}


def _tensor_properties_setstate(self: Any, state: Any) -> None:
    """``TensorProperties.__setstate__`` for the private subclass: codes, not enum members."""
    if not isinstance(state, tuple) or len(state) != 5:
        raise ValueError("TensorProperties state must be a 5-tuple")
    dtype, layout, requires_grad, mem_format, pin_memory = state
    if not isinstance(dtype, torch.dtype) or not isinstance(layout, torch.layout):
        raise ValueError("TensorProperties state holds no dtype/layout")
    self.__dict__.update(
        dtype=dtype, layout=layout, requires_grad=bool(requires_grad),
        memory_format=_MEMORY_FORMATS[_mem_format_code(mem_format)], pin_memory=bool(pin_memory),
    )


class _AllowlistUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, origin: str) -> None:
        super().__init__(file)
        self._origin = origin
        self._private: dict[tuple[str, str], Any] = {}

    def _refuse(self, module: str, name: str) -> UnsafeInputError:
        return UnsafeInputError(
            f"{self._origin}: refuses to load global {module}.{name}: a DCP .metadata file "
            "only references torch's checkpoint metadata classes, so this file is not a "
            "genuine checkpoint (or was crafted to run code). Nothing in it was executed."
        )

    def find_class(self, module: str, name: str) -> Any:
        if type(module) is not str or type(name) is not str:
            raise self._refuse(str(module), str(name))
        fn = _CALLABLES.get((module, name))
        if fn is not None:
            return self._private_function(module, name, fn)
        if module == "torch":
            value = vars(torch).get(name)
            if isinstance(value, (torch.dtype, torch.layout)):
                return value
            raise self._refuse(module, name)
        if name in _CLASSES.get(module, ()):
            return self._private_class(module, name)
        raise self._refuse(module, name)

    def _private_function(self, module: str, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        wrapper = self._private.get((module, name))
        if wrapper is None:
            def wrapper(*args: Any) -> Any:
                return fn(*args)

            self._private[(module, name)] = wrapper
        return wrapper

    def _private_class(self, module: str, name: str) -> type:
        cls = self._private.get((module, name))
        if cls is None:
            import importlib

            real = getattr(importlib.import_module(module), name)
            body: dict[str, Any] = {"__module__": __name__, "__qualname__": f"loaded.{name}"}
            if name == "TensorProperties":
                body["__setstate__"] = _tensor_properties_setstate
            cls = self._private[(module, name)] = type(name, (real,), body)
        return cls

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeInputError(f"{self._origin}: unexpected persistent id in a metadata pickle; it was not loaded")


def loads_metadata(data: bytes | bytearray | memoryview, origin: str = "<metadata>") -> Any:
    """Unpickle metadata bytes with the allowlist (see :func:`load_metadata_pickle`)."""
    try:
        return _AllowlistUnpickler(io.BytesIO(data), origin).load()
    except UnsafeInputError:
        raise
    except RecursionError as e:
        raise BadInputError(f"{origin}: metadata pickle is nested too deeply to be genuine") from e
    except MemoryError as e:
        raise BadInputError(f"{origin}: metadata pickle is too large to load") from e
    except Exception as e:  # pickle raises many types on corrupt input
        raise BadInputError(
            f"{origin}: not a readable DCP metadata pickle ({type(e).__name__}: {str(e)[:200]}); "
            "the file is truncated or corrupt -- copy the checkpoint again"
        ) from e


def load_metadata_pickle(path: pathlib.Path) -> Any:
    """Unpickle a DCP ``.metadata`` file allowing only the documented metadata classes.

    The objects returned are instances of private subclasses of torch's metadata classes
    (``isinstance`` works; see the module docstring for why).

    Raises:
        UnsafeInputError: the pickle references any other global.
        BadInputError: the file is too large, truncated or not a pickle.
    """
    size = check_regular(path).st_size
    if size > MAX_METADATA_BYTES:
        raise BadInputError(
            f"{path}: {size} bytes is far larger than any DCP metadata file; refusing to load it"
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadInputError(f"{path}: cannot read ({e.strerror})") from e
    return loads_metadata(data, str(path))


_REFUSED = re.compile(r"GLOBAL ([\w.]+)")


def is_weights_only_refusal(e: BaseException) -> bool:
    """Whether ``torch.load(weights_only=True)`` refused a global (rather than hit corrupt bytes)."""
    msg = str(e)
    return "Weights only load failed" in msg or "Unsupported global" in msg


def refused_global(e: BaseException) -> str:
    """What torch's weights-only unpickler refused, e.g. ``global posix.system``."""
    m = _REFUSED.search(str(e))
    return f"global {m.group(1)}" if m else "an object outside torch's weights-only allowlist"
