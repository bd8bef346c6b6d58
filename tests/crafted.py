"""Crafted pickles for the trust tests. Every payload, if it ever ran, would create ``marker``.

The tests only ever hand these bytes to shardfix's loaders and then assert the marker does not
exist. Nothing here unpickles them.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def _py(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


class Reduce:
    """An object whose pickle calls ``func(*args)`` on load (pickling it calls nothing)."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args

    # copying (which DCP's save may do) must not call ``func`` either
    def __copy__(self) -> Reduce:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Reduce:
        return self


def os_system(marker: Path) -> bytes:
    return pickle.dumps(Reduce(os.system, f"touch {marker}"))


def builtins_eval(marker: Path) -> bytes:
    return pickle.dumps(Reduce(eval, _py(marker)))


def builtins_exec(marker: Path) -> bytes:
    return pickle.dumps(Reduce(exec, _py(marker)))


def subprocess_popen(marker: Path) -> bytes:
    return pickle.dumps(Reduce(subprocess.Popen, ["touch", str(marker)]))


def getattr_chain(marker: Path) -> bytes:
    """``getattr(__import__('os'), 'system')('touch marker')`` in protocol-0 opcodes."""
    return (
        b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V"
        + f"touch {marker}".encode()
        + b"\ntR."
    )


def stack_global_dotted(marker: Path) -> bytes:
    """Protocol 4 ``STACK_GLOBAL`` with a dotted name reaching ``os`` through an allowed module."""
    mod = b"torch.distributed.checkpoint.metadata"
    name = b"os.system"
    arg = f"touch {marker}".encode()
    return (
        b"\x80\x04"
        + b"\x8c" + bytes([len(mod)]) + mod
        + b"\x8c" + bytes([len(name)]) + name
        + b"\x93"
        + b"\x8c" + bytes([len(arg)]) + arg
        + b"\x85R."
    )


def nested_in_allowed(marker: Path) -> bytes:
    """``torch.Size(os.system(...))``: a refused call nested inside an allowed one."""
    return pickle.dumps(Reduce(torch.Size, Reduce(os.system, f"touch {marker}")))


def module_global(module: str, name: str, marker: Path) -> bytes:
    """``module.name("touch marker")`` -- any global, called with one string."""
    return f"c{module}\n{name}\n(V{'touch ' + str(marker)}\ntR.".encode()


PAYLOADS = {
    "os.system": os_system,
    "builtins.eval": builtins_eval,
    "builtins.exec": builtins_exec,
    "subprocess.Popen": subprocess_popen,
    "getattr chain": getattr_chain,
    "dotted STACK_GLOBAL": stack_global_dotted,
    "nested reduce": nested_in_allowed,
}

#: Globals from modules a metadata pickle has no business naming, or unexpected names in
#: allowed modules (each refused by name, whatever it would do).
UNEXPECTED_GLOBALS = [
    ("torch.distributed.checkpoint.metadata", "os"),
    ("torch.distributed.checkpoint.metadata", "Enum"),
    ("torch.serialization", "load"),
    ("torch", "load"),
    ("torch", "_C"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("collections", "namedtuple"),
    ("pathlib", "os"),
    ("copyreg", "_reconstructor"),
    ("evil.metadata", "Metadata"),
    ("builtins", "getattr"),
    ("posix", "system"),
    ("shutil", "rmtree"),
]


def torch_save_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@dataclass
class TrainerState:
    """A benign custom class, as a custom optimizer or trainer would store (needs full unpickling)."""

    step: int
    note: str = "custom optimizer state"


def pollution_pickles() -> dict[str, bytes]:
    """Pickles that try to rewrite an allowed class, function or singleton with ``BUILD``."""
    md = b"torch.distributed.checkpoint.metadata"

    def sg(mod: bytes, name: bytes) -> bytes:
        return b"\x8c" + bytes([len(mod)]) + mod + b"\x8c" + bytes([len(name)]) + name + b"\x93"

    def slot_build(attr: bytes, value: bytes) -> bytes:
        # state (None, {attr: value}) -> setattr(target, attr, value)
        return b"N}\x8c" + bytes([len(attr)]) + attr + b"\x8c" + bytes([len(value)]) + value + b"s\x86b"

    return {
        # setattr(PosixPath, "_str", "/tmp/x"): every later str(path) would be "/tmp/x".
        "pathlib class": b"\x80\x04" + sg(b"pathlib", b"PosixPath") + slot_build(b"_str", b"/tmp/hijacked") + b".",
        # setattr(Metadata, "__doc__", ...) on the metadata class itself.
        "metadata class": b"\x80\x04" + sg(md, b"Metadata") + slot_build(b"__doc__", b"hijacked") + b".",
        # the shared enum member _MEM_FORMAT_ENCODING(0): setattr(member, "_value_", ...).
        "enum member": b"\x80\x04" + sg(md, b"_MEM_FORMAT_ENCODING") + b"K\x00\x85R" + slot_build(b"_name_", b"hijacked")
        + b".",
        # _get_layout.__dict__ update (its cache).
        "function": b"\x80\x04" + sg(b"torch.serialization", b"_get_layout") + b"}\x8c\x05cache}sb.",
        # setattr(torch.float32, ...).
        "dtype": b"\x80\x04" + sg(b"torch", b"float32") + slot_build(b"is_floating_point", b"x") + b".",
    }
