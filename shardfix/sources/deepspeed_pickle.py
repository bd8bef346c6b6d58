"""Read a DeepSpeed ``torch.save`` file's object tree without running anything and without reading tensors.

DeepSpeed's model-state and optimizer files are ordinary ``torch.save`` zips whose ``data.pkl``
names a few DeepSpeed classes besides torch's tensor rebuild functions, so
``torch.load(weights_only=True)`` refuses them and ``weights_only=False`` would run whatever a
crafted file names. :class:`_DeepSpeedUnpickler` extends the record layout unpickler of
:mod:`shardfix.sources.fastrecord` (tensor rebuild functions return a *description* of where
the tensor lies, never a tensor) with exactly the globals genuine DeepSpeed 0.19 files reference:

* ``deepspeed.runtime.fp16.loss_scaler.LossScaler`` / ``DynamicLossScaler`` and
  ``deepspeed.utils.tensor_fragment.fragment_address`` (built by ``NEWOBJ`` + ``BUILD``): a
  fresh inert class per load whose instances only keep a dict of plain values;
* ``deepspeed.runtime.zero.config.ZeroStageEnum`` (called with the stage number): the int;
* ``torch.Size``: a tuple of ints;
* ``torch._tensor._rebuild_from_type_v2`` with ``torch.Tensor`` (ZeRO-3 flat groups, which carry
  a ``ds_id`` attribute) and ``torch._utils._rebuild_parameter``: the inner description, the
  attributes checked to be plain values and otherwise ignored.

DeepSpeed is never imported. Storage members are located through the zip's central directory
(:func:`shardfix.io.zipdir.read_directory`), so a tensor is a file offset, not bytes in memory.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shardfix.dtypes import numel
from shardfix.errors import BadInputError, UnsafeInputError
from shardfix.io import zipdir
from shardfix.io.preads import pread_upto
from shardfix.io.regular import open_regular
from shardfix.sources import fastrecord as fr

_SCALARS = (str, int, float, bool, type(None))
_INERT_CLASSES = {
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
}
_TENSOR_TYPE = object()  # what ``torch.Tensor`` resolves to: only a marker for _rebuild_from_type_v2
_MAX_PICKLE = 64 << 20


class Inert:
    """An instance of a DeepSpeed class, kept as its name and a dict of plain values."""

    class_name = ""

    def __new__(cls, *args: Any) -> Inert:
        if args:
            raise fr._Decline(f"{cls.class_name} built with arguments")
        return super().__new__(cls)

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or not all(type(k) is str and isinstance(v, _SCALARS) for k, v in state.items()):
            raise fr._Decline(f"{self.class_name} state is not a dict of plain values")
        self.state = dict(state)

    def plain(self) -> dict[str, Any]:
        return {"class": self.class_name, **getattr(self, "state", {})}


def _size(dims: Any = ()) -> tuple[int, ...]:
    if not isinstance(dims, (tuple, list)) or not all(type(d) is int and d >= 0 for d in dims):
        raise fr._Decline("torch.Size of non-integers")
    return tuple(dims)


def _zero_stage(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= 3:
        raise fr._Decline(f"unknown ZeRO stage {value!r}")
    return value


def _plain_attrs(state: Any) -> None:
    if state is None:
        return
    if not isinstance(state, dict) or not all(type(k) is str and isinstance(v, _SCALARS) for k, v in state.items()):
        raise fr._Decline("tensor attributes are not plain values")


def _from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> fr._Rebuilt:
    if func not in (fr._rebuild_v2, fr._rebuild_v3) or new_type is not _TENSOR_TYPE or not isinstance(args, tuple):
        raise fr._Decline("_rebuild_from_type_v2 with anything but a plain tensor")
    _plain_attrs(state)
    return func(*args)


def _parameter(data: Any, requires_grad: Any, backward_hooks: Any, state: Any = None) -> fr._Rebuilt:
    if not isinstance(data, fr._Rebuilt) or backward_hooks:
        raise fr._Decline("_rebuild_parameter of anything but a plain tensor")
    _plain_attrs(state)
    return data


class _DeepSpeedUnpickler(fr._LayoutUnpickler):
    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self._inert: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _INERT_CLASSES:
            if name not in self._inert:
                self._inert[name] = type(name, (Inert,), {"class_name": name, "__module__": __name__})
            return self._inert[name]
        table = {
            ("deepspeed.runtime.zero.config", "ZeroStageEnum"): _zero_stage,
            ("torch", "Size"): _size,
            ("torch", "Tensor"): _TENSOR_TYPE,
            ("torch._tensor", "_rebuild_from_type_v2"): _from_type_v2,
            ("torch._utils", "_rebuild_parameter"): _parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
        }
        if (module, name) in table:
            return table[(module, name)]
        return super().find_class(module, name)


@dataclass(frozen=True, slots=True)
class Stored:
    """A tensor inside a DeepSpeed file: where its element 0 lies and how it is laid out."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    start: int  # absolute file offset of element 0 (storage start + storage offset)
    storage_nbytes: int

    @property
    def numel(self) -> int:
        return numel(self.shape)

    def is_flat(self) -> bool:
        """Its elements are one run of bytes in row-major order."""
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


def load_tree(path: Path) -> Any:
    """The file's object tree, every tensor replaced by a :class:`Stored` (no tensor bytes read).

    Raises:
        UnsafeInputError: the pickle references a global outside the allowlist.
        BadInputError: the file is missing, not a plain torch.save zip, or malformed.
    """
    if not os.path.exists(path):
        raise BadInputError(f"{path}: missing; the DeepSpeed checkpoint is incomplete")
    fd = open_regular(path)
    try:
        return _load(fd, path)
    finally:
        os.close(fd)


def _load(fd: int, path: Path) -> Any:
    length = os.fstat(fd).st_size
    try:
        try:
            entries, end = zipdir.read_directory(lambda offset, n: pread_upto(fd, offset, n), length)
        except zipdir.ZipError as e:
            raise fr._Decline(str(e)) from e
        pkl = [n for n in entries if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1 or entries[pkl[0]].size > _MAX_PICKLE:
            raise fr._Decline("no single data.pkl")
        prefix = pkl[0].split("/", 1)[0]
        _, data = fr._entry_data(fd, 0, end, entries[pkl[0]], read=True)
        tree = _DeepSpeedUnpickler(io.BytesIO(data)).load()
        members: dict[str, tuple[int, int]] = {}

        def locate(r: fr._Rebuilt) -> Stored:
            key = r.storage.key
            if key not in members:
                name = f"{prefix}/data/{key}"
                if name not in entries:
                    raise fr._Decline(f"no member {name}")
                members[key] = (fr._entry_data(fd, 0, end, entries[name], read=False)[0], entries[name].size)
            start, nbytes = members[key]
            item = r.dtype.itemsize
            last = r.storage_offset + sum((s - 1) * st for s, st in zip(r.size, r.stride, strict=True)) \
                if all(r.size) else r.storage_offset - 1
            if (last + 1) * item > nbytes:
                raise fr._Decline(f"tensor in storage {key} addresses bytes outside it")
            return Stored(path, r.dtype, r.size, r.stride, start + r.storage_offset * item, nbytes)

        return _replace(tree, locate)
    except fr._Decline as e:
        if str(e).startswith("global "):
            raise UnsafeInputError(
                f"{path}: refuses to load {e}: a DeepSpeed checkpoint file only references torch's tensor "
                "classes and a few DeepSpeed records (LossScaler, ZeroStageEnum, fragment_address), so this file "
                "is not a genuine checkpoint (or was crafted to run code). Nothing in it was executed."
            ) from None
        raise BadInputError(f"{path}: not a DeepSpeed checkpoint file shardfix can read ({e})") from None
    except (pickle.UnpicklingError, OSError, ValueError, EOFError, UnicodeError, IndexError, KeyError, TypeError) as e:
        raise BadInputError(f"{path}: corrupt or truncated ({type(e).__name__}: {str(e)[:200]}); copy it again") from e


def _replace(obj: Any, locate: Any) -> Any:
    if isinstance(obj, fr._Rebuilt):
        return locate(obj)
    if isinstance(obj, dict):
        return {k: _replace(v, locate) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_replace(v, locate) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_replace(v, locate) for v in obj)
    return obj


def plain(obj: Any) -> Any:
    """A JSON-friendly copy of a non-tensor value (inert records become dicts)."""
    if isinstance(obj, Inert):
        return obj.plain()
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, Stored):
        return f"<tensor {obj.dtype} {list(obj.shape)}>"
    return obj
