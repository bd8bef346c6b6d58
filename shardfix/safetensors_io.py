"""A streaming safetensors writer and the Hugging Face index files.

The header is computed from the planned names, dtypes and shapes before any data exists; each
tensor is then written straight after the previous one, so the writer holds one tensor at a
time (``safetensors.torch.save_file`` builds the whole file in memory). Bytes are hashed as
they are written (xxh3), and the file is written under a temporary name, fsynced and renamed.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

from shardfix.dtypes import itemsize, numel, st_name
from shardfix.errors import InternalError, OutputError

_MAX_WRITE = 1 << 30
HASH_NAME = "xxh3_64"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * itemsize(self.dtype)


def build_header(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The exact header bytes (length prefix included) for tensors written in ``specs`` order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (any dtype, including 0-d)."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    if flat.stride(0) != 1:  # a 1-element view counts as contiguous but may keep its parent's stride
        flat = flat.clone(memory_format=torch.contiguous_format)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def tensor_checksum(t: torch.Tensor) -> str:
    return xxhash.xxh3_64_hexdigest(tensor_bytes(t.contiguous()))


def _write_all(fd: int, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done : done + _MAX_WRITE])


@dataclass(slots=True)
class WrittenTensor:
    name: str
    dtype: str
    shape: list[int]
    checksum: str


@dataclass(slots=True)
class WrittenFile:
    name: str
    bytes: int
    checksum: str
    tensors: list[WrittenTensor] = field(default_factory=list)


class StreamingWriter:
    """Write one safetensors file tensor by tensor, in the order the header fixes.

    Use as a context manager; leaving the block with an exception removes the temporary file.
    """

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.specs = specs
        self._next = 0
        self._file_hash = xxhash.xxh3_128()
        self._written: list[WrittenTensor] = []
        header = build_header(specs, metadata)
        try:
            self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            total = len(header) + sum(s.nbytes for s in specs)
            try:
                os.posix_fallocate(self._fd, 0, total) if total else None
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                    raise
        except OSError as e:
            self._cleanup()
            raise OutputError(f"{path}: cannot write {len(header) + sum(s.nbytes for s in specs):,} bytes "
                              f"({e.strerror}); free space (or raise the quota or file-size limit) and rerun with "
                              "--resume") from e
        self._bytes = 0
        self._emit(memoryview(header))

    def _emit(self, data: memoryview, what: str = "the header") -> None:
        try:
            _write_all(self._fd, data)
        except OSError as e:
            raise OutputError(f"{self.path}: write failed at {what} ({e.strerror}); free space and rerun with "
                              "--resume") from e
        self._file_hash.update(data)
        self._bytes += len(data)

    def write(self, name: str, t: torch.Tensor) -> WrittenTensor:
        """Write the next tensor; it must match the header's next spec exactly."""
        spec = self.specs[self._next]
        if name != spec.name or st_name(t.dtype) != spec.dtype or tuple(t.shape) != spec.shape:
            raise InternalError(
                f"{self.path}: tensor {name} {st_name(t.dtype)} {list(t.shape)} does not match the "
                f"planned {spec.name} {spec.dtype} {list(spec.shape)}"
            )
        data = tensor_bytes(t.contiguous())
        self._emit(data, f"tensor {name}")
        wt = WrittenTensor(name, spec.dtype, list(spec.shape), xxhash.xxh3_64_hexdigest(data))
        self._written.append(wt)
        self._next += 1
        return wt

    def finish(self) -> WrittenFile:
        """fsync, rename into place and return what was written."""
        if self._next != len(self.specs):
            raise InternalError(f"{self.path}: {len(self.specs) - self._next} planned tensors were not written")
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.replace(self.tmp, self.path)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot finish ({e.strerror})") from e
        return WrittenFile(self.path.name, self._bytes, self._file_hash.hexdigest(), self._written)

    def _cleanup(self) -> None:
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            os.close(fd)
            self._fd = -1
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self._cleanup()


def file_checksum(path: Path) -> str:
    """xxh3-128 of a whole file, read in large blocks."""
    h = xxhash.xxh3_128()
    with path.open("rb", buffering=0) as f:
        buf = bytearray(16 << 20)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def write_json_atomic(path: Path, obj: object) -> None:
    """Write JSON to a temporary name, fsync, and rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({e.strerror})") from e


def index_json(weight_map: dict[str, str], total_size: int) -> dict[str, object]:
    """The Hugging Face ``*.safetensors.index.json`` document."""
    return {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
