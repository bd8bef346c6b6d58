"""Tensor operations a plan records: one dataclass per op, kept in plans as its JSON dict.

Each op knows how to ``apply`` itself to a tensor, the ``shape`` it produces (from shapes alone)
and, when its result is one contiguous run of its input's row-major bytes, the ``window`` of bytes
it keeps -- so a tensor can be copied file to file instead of computed. Plans, reports and Ray
tasks carry ops as small JSON dicts (``{"op": "narrow", "dim": 0, ...}``: :meth:`Op.to_dict`,
:func:`parse`); the constructors below return that form. Everything here is pure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch

from shardfix.dtypes import torch_dtype

OpDict = dict[str, Any]
Shape = tuple[int, ...]


def _numel(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class Op:
    """Base of every op. ``window`` returns ``(byte offset, new shape)`` or None when not a plain byte run."""

    name: ClassVar[str]

    def apply(self, t: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def shape(self, shape: Shape) -> Shape:
        return tuple(self.apply(torch.empty(shape, device="meta")).shape)

    def window(self, shape: Shape, itemsize: int) -> tuple[int, Shape] | None:
        return None

    def to_dict(self) -> OpDict:
        return {"op": self.name, **asdict(self)}  # type: ignore[call-overload]


def _row_bytes(shape: Shape, dim: int, itemsize: int) -> int | None:
    """Bytes of one index along ``dim``, when every leading dim has size 1 (else the cut is not one run)."""
    if not shape or any(d != 1 for d in shape[:dim]):
        return None
    return itemsize * _numel(shape[dim + 1:])


@dataclass(frozen=True, slots=True)
class Narrow(Op):
    name: ClassVar[str] = "narrow"
    dim: int
    start: int
    length: int

    def apply(self, t: torch.Tensor | None) -> torch.Tensor:
        assert t is not None
        return t.narrow(self.dim, self.start, self.length)

    def window(self, shape: Shape, itemsize: int) -> tuple[int, Shape] | None:
        dim = self.dim % len(shape) if shape else 0
        row = _row_bytes(shape, dim, itemsize)
        if row is None or self.start < 0 or self.length < 0 or self.start + self.length > shape[dim]:
            return None
        return self.start * row, (*shape[:dim], self.length, *shape[dim + 1:])


@dataclass(frozen=True, slots=True)
class Select(Op):
    name: ClassVar[str] = "select"
    dim: int
    index: int

    def apply(self, t: torch.Tensor | None) -> torch.Tensor:
        assert t is not None
        return t.select(self.dim, self.index)

    def window(self, shape: Shape, itemsize: int) -> tuple[int, Shape] | None:
        dim = self.dim % len(shape) if shape else 0
        row = _row_bytes(shape, dim, itemsize)
        if row is None or not -shape[dim] <= self.index < shape[dim]:
            return None
        return (self.index % shape[dim]) * row, (*shape[:dim], *shape[dim + 1:])


@dataclass(frozen=True, slots=True)
class Reshape(Op):
    name: ClassVar[str] = "reshape"
    shape_: list[int]

    def apply(self, t: torch.Tensor | None) -> torch.Tensor:
        assert t is not None
        return t.reshape(self.shape_)

    def window(self, shape: Shape, itemsize: int) -> tuple[int, Shape] | None:
        new = tuple(self.shape_)
        return None if -1 in new or _numel(new) != _numel(shape) else (0, new)

    def to_dict(self) -> OpDict:
        return {"op": self.name, "shape": list(self.shape_)}


@dataclass(frozen=True, slots=True)
class Transpose(Op):
    name: ClassVar[str] = "transpose"
    dims: list[int]

    def apply(self, t: torch.Tensor | None) -> torch.Tensor:
        assert t is not None
        return t.transpose(self.dims[0], self.dims[1])


@dataclass(frozen=True, slots=True)
class Cast(Op):
    name: ClassVar[str] = "cast"
    dtype: str

    def apply(self, t: torch.Tensor | None) -> torch.Tensor:
        assert t is not None
        return t.to(torch_dtype(self.dtype))

    def shape(self, shape: Shape) -> Shape:
        return shape


@dataclass(frozen=True, slots=True)
class Blocks(Op):
    """Keep the first ``keep`` of each of ``count`` blocks of ``block`` along ``dim``."""

    name: ClassVar[str] = "blocks"
    dim: int
    block: int
    keep: int
    count: int

    def apply(self, t: torch.Tensor | None) -> torch.Tensor:
        assert t is not None
        return torch.cat([t.narrow(self.dim, i * self.block, self.keep) for i in range(self.count)], dim=self.dim)

    def shape(self, shape: Shape) -> Shape:
        s = list(shape)
        s[self.dim] = self.keep * self.count
        return tuple(s)


@dataclass(frozen=True, slots=True)
class Grow(Op):
    """Extend ``dim`` to ``length`` with rows filled by ``fill`` (``zeros``, or ``mean`` of the existing rows)."""

    name: ClassVar[str] = "grow"
    dim: int
    length: int
    fill: str

    def apply(self, t: torch.Tensor | None) -> torch.Tensor:
        assert t is not None
        shape = list(t.shape)
        shape[self.dim] = self.length - t.shape[self.dim]
        if self.fill == "mean":
            # on the host wherever ``t`` lives: a GPU's reduction order would change the bytes
            mean = t.detach().cpu().float().mean(dim=self.dim, keepdim=True).to(t.dtype)
            pad = mean.to(t.device).expand(shape)
        else:
            pad = torch.zeros(shape, dtype=t.dtype, device=t.device)
        return torch.cat([t, pad], dim=self.dim)

    def shape(self, shape: Shape) -> Shape:
        s = list(shape)
        s[self.dim] = self.length
        return tuple(s)


@dataclass(frozen=True, slots=True)
class Value(Op):
    """A 0-d tensor made from a Python number stored in the checkpoint (e.g. ``step``); ignores its input."""

    name: ClassVar[str] = "value"
    value: float | int | bool
    dtype: str

    def apply(self, t: torch.Tensor | None) -> torch.Tensor:
        return torch.tensor(self.value, dtype=torch_dtype(self.dtype))

    def shape(self, shape: Shape) -> Shape:
        return ()


#: Every op by its JSON name; a new op is one dataclass plus one entry here.
OPS: dict[str, type[Op]] = {c.name: c for c in (Narrow, Select, Reshape, Transpose, Cast, Blocks, Grow, Value)}


def parse(d: OpDict | Op) -> Op:
    """The op a JSON dict describes (an :class:`Op` is returned as is)."""
    if isinstance(d, Op):
        return d
    cls = OPS.get(d.get("op", ""))
    if cls is None:
        raise ValueError(f"unknown op {d.get('op')!r}")
    args = {f.name: d["shape" if f.name == "shape_" else f.name] for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**args)


def narrow(dim: int, start: int, length: int) -> OpDict:
    return Narrow(dim, start, length).to_dict()


def select(dim: int, index: int) -> OpDict:
    return Select(dim, index).to_dict()


def reshape(shape: list[int] | tuple[int, ...]) -> OpDict:
    return Reshape(list(shape)).to_dict()


def transpose(dim0: int, dim1: int) -> OpDict:
    return Transpose([dim0, dim1]).to_dict()


def cast(dtype: str) -> OpDict:
    return Cast(dtype).to_dict()


def blocks(dim: int, block: int, keep: int, count: int) -> OpDict:
    """Keep the first ``keep`` of each of ``count`` blocks of ``block`` along ``dim``."""
    return Blocks(dim, block, keep, count).to_dict()


def grow(dim: int, length: int, fill: str) -> OpDict:
    """Extend ``dim`` to ``length`` with rows filled by ``fill`` ("zeros" or "mean")."""
    return Grow(dim, length, fill).to_dict()


def value(v: float | int | bool, dtype: str) -> OpDict:
    """A 0-d tensor made from a Python number stored in the checkpoint (e.g. ``step``)."""
    return Value(v, dtype).to_dict()


def is_value(ops: list[OpDict]) -> bool:
    """True when the tensor is made from a stored number, not read from the source."""
    return bool(ops) and ops[0]["op"] == Value.name


def apply_ops(t: torch.Tensor | None, ops: list[OpDict]) -> torch.Tensor:
    """Apply ``ops`` in order. ``t`` may be None only when the first op is ``value``."""
    for op in ops:
        t = parse(op).apply(t)
    assert t is not None
    return t


def out_shape(shape: tuple[int, ...], ops: list[OpDict]) -> tuple[int, ...]:
    """The shape ``apply_ops`` produces, from shapes alone (no data)."""
    out = tuple(shape)
    for op in ops:
        out = parse(op).shape(out)
    return out


def byte_window(shape: tuple[int, ...], itemsize: int, ops: list[OpDict]) -> tuple[int, int] | None:
    """The run ``[start, stop)`` of the source's row-major bytes that ``apply_ops`` returns.

    Defined when every op keeps the result one contiguous run of the source's bytes: a
    ``narrow`` or ``select`` whose leading dimensions all have size 1 (a vocab trim on dim 0, a
    fused part), or a ``reshape``. Any other op (cast, transpose, blocks, grow, value) gives
    None: the tensor must be computed, not copied.
    """
    cur = tuple(shape)
    start = 0
    for op in ops:
        step = parse(op).window(cur, itemsize)
        if step is None:
            return None
        start += step[0]
        cur = step[1]
    return start, start + _numel(cur) * itemsize
