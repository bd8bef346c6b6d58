"""Mapping between torch dtypes and safetensors dtype names."""

from __future__ import annotations

import torch

from shardfix.errors import BadInputError

_PAIRS: list[tuple[str, str]] = [
    ("F64", "float64"),
    ("F32", "float32"),
    ("F16", "float16"),
    ("BF16", "bfloat16"),
    ("I64", "int64"),
    ("I32", "int32"),
    ("I16", "int16"),
    ("I8", "int8"),
    ("U64", "uint64"),
    ("U32", "uint32"),
    ("U16", "uint16"),
    ("U8", "uint8"),
    ("BOOL", "bool"),
    ("C64", "complex64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E8M0", "float8_e8m0fnu"),
]

ST_TO_TORCH: dict[str, torch.dtype] = {
    st: getattr(torch, name) for st, name in _PAIRS if hasattr(torch, name)
}
TORCH_TO_ST: dict[torch.dtype, str] = {dt: st for st, dt in ST_TO_TORCH.items()}

#: ``--dtype`` choices and the safetensors dtype each casts floating tensors to.
CAST_CHOICES: dict[str, str | None] = {"keep": None, "bf16": "BF16", "fp16": "F16", "fp32": "F32"}

FLOAT_NAMES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"})


def st_name(dtype: torch.dtype) -> str:
    """Return the safetensors name of a torch dtype, or raise naming the dtype."""
    try:
        return TORCH_TO_ST[dtype]
    except KeyError:
        raise BadInputError(f"dtype {dtype} has no safetensors equivalent") from None


def torch_dtype(name: str) -> torch.dtype:
    """Return the torch dtype for a safetensors dtype name."""
    try:
        return ST_TO_TORCH[name]
    except KeyError:
        raise BadInputError(f"unknown safetensors dtype {name!r}") from None


def itemsize(name: str) -> int:
    """Bytes per element of a safetensors dtype."""
    return torch_dtype(name).itemsize


def numel(shape: tuple[int, ...] | list[int]) -> int:
    """Number of elements of a shape (1 for a 0-d shape)."""
    n = 1
    for d in shape:
        n *= int(d)
    return n
