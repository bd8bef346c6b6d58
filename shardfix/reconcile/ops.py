"""Tensor operations a plan records, as data, and the one function that applies them.

Each op is a small JSON-serialisable dict so plans can be printed, stored in the report, and
sent to Ray tasks. ``apply_ops`` is pure: it never touches files.
"""

from __future__ import annotations

from typing import Any

import torch

from shardfix.dtypes import torch_dtype

Op = dict[str, Any]


def narrow(dim: int, start: int, length: int) -> Op:
    return {"op": "narrow", "dim": dim, "start": start, "length": length}


def select(dim: int, index: int) -> Op:
    return {"op": "select", "dim": dim, "index": index}


def reshape(shape: list[int] | tuple[int, ...]) -> Op:
    return {"op": "reshape", "shape": list(shape)}


def transpose(dim0: int, dim1: int) -> Op:
    return {"op": "transpose", "dims": [dim0, dim1]}


def cast(dtype: str) -> Op:
    return {"op": "cast", "dtype": dtype}


def blocks(dim: int, block: int, keep: int, count: int) -> Op:
    """Keep the first ``keep`` of each of ``count`` blocks of ``block`` along ``dim``."""
    return {"op": "blocks", "dim": dim, "block": block, "keep": keep, "count": count}


def grow(dim: int, length: int, fill: str) -> Op:
    """Extend ``dim`` to ``length`` with rows filled by ``fill`` ("zeros" or "mean")."""
    return {"op": "grow", "dim": dim, "length": length, "fill": fill}


def value(v: float | int | bool, dtype: str) -> Op:
    """A 0-d tensor made from a Python number stored in the checkpoint (e.g. ``step``)."""
    return {"op": "value", "value": v, "dtype": dtype}


def apply_ops(t: torch.Tensor | None, ops: list[Op]) -> torch.Tensor:
    """Apply ``ops`` in order. ``t`` may be None only when the first op is ``value``."""
    for op in ops:
        kind = op["op"]
        if kind == "value":
            t = torch.tensor(op["value"], dtype=torch_dtype(op["dtype"]))
        elif kind == "narrow":
            t = t.narrow(op["dim"], op["start"], op["length"])
        elif kind == "select":
            t = t.select(op["dim"], op["index"])
        elif kind == "reshape":
            t = t.reshape(op["shape"])
        elif kind == "transpose":
            t = t.transpose(*op["dims"])
        elif kind == "cast":
            t = t.to(torch_dtype(op["dtype"]))
        elif kind == "blocks":
            parts = [t.narrow(op["dim"], i * op["block"], op["keep"]) for i in range(op["count"])]
            t = torch.cat(parts, dim=op["dim"])
        elif kind == "grow":
            dim, length = op["dim"], op["length"]
            extra = length - t.shape[dim]
            shape = list(t.shape)
            shape[dim] = extra
            if op["fill"] == "mean":
                # on the host wherever ``t`` lives: a GPU's reduction order would change the bytes
                mean = t.detach().cpu().float().mean(dim=dim, keepdim=True).to(t.dtype)
                pad = mean.to(t.device).expand(shape)
            else:
                pad = torch.zeros(shape, dtype=t.dtype, device=t.device)
            t = torch.cat([t, pad], dim=dim)
        else:  # pragma: no cover - plans are built by shardfix
            raise ValueError(f"unknown op {kind!r}")
    assert t is not None
    return t


def out_shape(shape: tuple[int, ...], ops: list[Op]) -> tuple[int, ...]:
    """The shape ``apply_ops`` produces, computed on the meta device (no data)."""
    if ops and ops[0]["op"] == "value":
        return ()
    meta = torch.empty(shape, device="meta")
    for op in ops:
        if op["op"] in ("cast",):
            continue
        if op["op"] == "grow":
            s = list(meta.shape)
            s[op["dim"]] = op["length"]
            meta = torch.empty(s, device="meta")
            continue
        if op["op"] == "blocks":
            s = list(meta.shape)
            s[op["dim"]] = op["keep"] * op["count"]
            meta = torch.empty(s, device="meta")
            continue
        meta = apply_ops(meta, [op])
    return tuple(meta.shape)


def byte_window(shape: tuple[int, ...], itemsize: int, ops: list[Op]) -> tuple[int, int] | None:
    """The run ``[start, stop)`` of the source's row-major bytes that ``apply_ops`` returns.

    Defined when every op keeps the result one contiguous run of the source's bytes: a
    ``narrow`` or ``select`` whose leading dimensions all have size 1 (a vocab trim on dim 0, a
    fused part), or a ``reshape``. Any other op (cast, transpose, blocks, grow, value) gives
    None: the tensor must be computed, not copied.
    """
    shape = tuple(shape)
    start = 0
    for op in ops:
        kind = op["op"]
        if kind in ("narrow", "select"):
            dim = op["dim"] % len(shape) if shape else 0
            if not shape or any(d != 1 for d in shape[:dim]):
                return None
            row = itemsize
            for d in shape[dim + 1 :]:
                row *= d
            if kind == "narrow":
                if op["start"] < 0 or op["length"] < 0 or op["start"] + op["length"] > shape[dim]:
                    return None
                start += op["start"] * row
                shape = (*shape[:dim], op["length"], *shape[dim + 1 :])
            else:
                index = op["index"] % shape[dim] if shape[dim] else -1
                if index < 0 or not -shape[dim] <= op["index"] < shape[dim]:
                    return None
                start += index * row
                shape = (*shape[:dim], *shape[dim + 1 :])
        elif kind == "reshape":
            new = tuple(op["shape"])
            if -1 in new or _numel(new) != _numel(shape):
                return None
            shape = new
        else:
            return None
    return start, start + _numel(shape) * itemsize


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
