"""A streaming safetensors writer and the Hugging Face index files.

The header is computed from the planned names, dtypes and shapes before any data exists
(:func:`shardfix.io.st_header.build_header`, re-exported here for the executor); each
tensor is then written straight after the previous one, so the writer holds one tensor at a
time (``safetensors.torch.save_file`` builds the whole file in memory) -- or none at all: a
tensor whose bytes already lie in source files (:meth:`StreamingWriter.write_ranges`) is
copied through one small reused buffer. Bytes are hashed as they are written (xxh3, per tensor
and per file) in blocks small enough to stay in the CPU cache between the read, the two hashes
and the write. The file is written under a temporary name, fsynced and renamed; with
``verify`` it is re-read and re-hashed while the fsync runs (see :meth:`StreamingWriter.finish`).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import sys
import threading
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

from shardfix.dtypes import itemsize, numel, st_name
from shardfix.errors import IncompleteSourceError, InternalError, OutputError
from shardfix.io.preads import fill, fill_upto
from shardfix.io.st_header import build_header
from shardfix.io.text import strict_value
from shardfix.sources.base import ByteRange

HASH_NAME = "xxh3_64"
#: Bytes moved per step: small enough that a block read from the source is still in the CPU
#: cache when it is hashed twice and written (measured: 1 MiB beats 8-32 MiB by ~25%).
BLOCK = 1 << 20
#: Buffers in flight between reading and the CRC-32 thread.
RING = 4
#: Start the disk writing what has been written so far every this many bytes, so the final
#: fsync waits for the tail only and the disk works while the CPU hashes and copies.
WRITEBACK_STEP = 4 << 20


def _writeback_starter() -> Callable[[int, int, int], None] | None:
    """``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)`` on Linux, else None.

    It only *starts* writeback of dirty pages (it waits for nothing and guarantees nothing:
    durability still comes from fsync), which overlaps the disk's work with ours.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    write = 2  # SYNC_FILE_RANGE_WRITE
    return lambda fd, offset, nbytes: fn(fd, offset, nbytes, write)


_start_writeback = _writeback_starter()


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * itemsize(self.dtype)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (any dtype, including 0-d)."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    if flat.stride(0) != 1:  # a 1-element view counts as contiguous but may keep its parent's stride
        flat = flat.clone(memory_format=torch.contiguous_format)
    return flat.view(torch.uint8).numpy().data.cast("B")


def tensor_checksum(t: torch.Tensor) -> str:
    return xxhash.xxh3_64_hexdigest(tensor_bytes(t.contiguous()))


class _Crc:
    """A running CRC-32 fed in order by one helper thread."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def update(self, block: memoryview) -> None:
        self.value = zlib.crc32(block, self.value)

    def result(self, pool: ThreadPoolExecutor | None) -> int:
        if pool is not None:
            pool.submit(int).result()  # jobs run in order: this one runs after every update
        return self.value


def _write_all(fd: int, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])


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
        self._ring: list[memoryview] = []  # BLOCK-sized buffers for write_ranges, reused
        self._busy: list[Future[None] | None] = []  # per buffer: the CRC job still reading it
        self._turn = 0
        self._crc_pool: ThreadPoolExecutor | None = None
        self._flushed = 0
        header = build_header(specs, metadata)
        try:
            self._fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)  # RDWR: finish re-reads it
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

    def _emit(self, data: memoryview, tensor_hash: xxhash.xxh3_64 | None = None, what: str = "the header") -> None:
        """Hash (file and tensor) and write ``data`` block by block."""
        for i in range(0, len(data), BLOCK):
            block = data[i : i + BLOCK]
            if tensor_hash is not None:
                tensor_hash.update(block)
            self._file_hash.update(block)
            try:
                _write_all(self._fd, block)
            except OSError as e:
                raise OutputError(f"{self.path}: write failed at {what} ({e.strerror}); free space and rerun with "
                                  "--resume") from e
            self._bytes += len(block)
            if _start_writeback is not None and self._bytes - self._flushed >= WRITEBACK_STEP:
                _start_writeback(self._fd, self._flushed, self._bytes - self._flushed)  # a hint: errors ignored
                self._flushed = self._bytes

    def _next_spec(self, name: str, dtype: str, shape: tuple[int, ...]) -> TensorSpec:
        spec = self.specs[self._next]
        if name != spec.name or dtype != spec.dtype or shape != spec.shape:
            raise InternalError(
                f"{self.path}: tensor {name} {dtype} {list(shape)} does not match the "
                f"planned {spec.name} {spec.dtype} {list(spec.shape)}"
            )
        return spec

    def _done(self, spec: TensorSpec, tensor_hash: xxhash.xxh3_64) -> WrittenTensor:
        wt = WrittenTensor(spec.name, spec.dtype, list(spec.shape), tensor_hash.hexdigest())
        self._written.append(wt)
        self._next += 1
        return wt

    def write(self, name: str, t: torch.Tensor) -> WrittenTensor:
        """Write the next tensor; it must match the header's next spec exactly."""
        spec = self._next_spec(name, st_name(t.dtype), tuple(t.shape))
        h = xxhash.xxh3_64()
        self._emit(tensor_bytes(t.contiguous()), h, f"tensor {name}")
        return self._done(spec, h)

    def write_ranges(self, name: str, dtype: str, shape: tuple[int, ...], ranges: Sequence[ByteRange]) -> WrittenTensor:
        """Write the next tensor by copying its bytes from source files, in order.

        The bytes pass through one reused :data:`BLOCK`-sized buffer: memory does not grow with
        the tensor, and nothing is assembled. A range with a :class:`MemberCheck` has the
        CRC-32 of its zip member checked on the way (the part of the member outside the range,
        such as trimmed vocab rows, is read for the check only).
        """
        spec = self._next_spec(name, dtype, shape)
        if sum(r.nbytes for r in ranges) != spec.nbytes:
            raise InternalError(f"{self.path}: byte ranges for {name} do not add up to {spec.nbytes} bytes")
        if not self._ring:
            self._ring = [memoryview(bytearray(BLOCK)) for _ in range(RING)]
            self._busy = [None] * RING
        h = xxhash.xxh3_64()
        for r in ranges:
            chk = r.check
            if chk is None:
                self._copy(r, r.offset, r.nbytes, name, h, None)
                continue
            if not chk.start <= r.offset <= r.offset + r.nbytes <= chk.start + chk.nbytes:
                raise InternalError(f"{r.origin}: range for {name} lies outside the member that checks it")
            crc = _Crc()
            end = r.offset + r.nbytes
            self._copy(r, chk.start, r.offset - chk.start, name, None, crc)  # bytes trimmed away: CRC only
            self._copy(r, r.offset, r.nbytes, name, h, crc)
            self._copy(r, end, chk.start + chk.nbytes - end, name, None, crc)
            if crc.result(self._crc_pool) != chk.crc32:
                raise IncompleteSourceError(
                    f"{r.origin}: the record for {chk.key} is damaged: member {chk.member} fails its CRC-32 "
                    "check (its bytes changed after torch.save wrote them); copy the file again from the "
                    "machine that saved it"
                )
        return self._done(spec, h)

    def _copy(self, r: ByteRange, offset: int, nbytes: int, name: str, h: xxhash.xxh3_64 | None,
              crc: _Crc | None) -> None:
        """Read ``nbytes`` at ``offset`` of ``r.fd``; with ``h`` hash and write them, with ``crc`` CRC them.

        The CRC-32 runs on a helper thread (zlib releases the GIL), overlapping the hashing and
        writing here; a buffer is reused only once its CRC job is done.
        """
        done = 0
        while done < nbytes:
            slot = self._turn % RING
            self._turn += 1
            job = self._busy[slot]
            if job is not None:
                job.result()
                self._busy[slot] = None
            buf = self._ring[slot]
            n = min(BLOCK, nbytes - done)
            block = buf[:n]
            fill(r.fd, offset + done, block, r.origin, name)
            if crc is not None:
                if self._crc_pool is None:
                    self._crc_pool = ThreadPoolExecutor(1, thread_name_prefix="shardfix-crc")
                self._busy[slot] = self._crc_pool.submit(crc.update, block)
            if h is not None:
                self._emit(block, h, f"tensor {name}")
            done += n

    def finish(self, verify: bool = False) -> WrittenFile:
        """fsync, rename into place and return what was written.

        With ``verify`` the file is read back and re-hashed *while* the fsync runs (the re-read
        is served from the page cache, so the two overlap instead of adding up); a mismatch
        raises :class:`OutputError` and removes the file. This catches a short or misplaced
        write and corruption on the way into the kernel -- not a disk that loses data after
        acknowledging the fsync (``shardfix verify`` after the page cache is gone checks that).
        """
        if self._next != len(self.specs):
            raise InternalError(f"{self.path}: {len(self.specs) - self._next} planned tensors were not written")
        self._stop_crc()
        expected = self._file_hash.hexdigest()
        failure: list[OSError] = []

        def sync() -> None:
            try:
                os.fsync(self._fd)
            except OSError as e:
                failure.append(e)

        syncer = threading.Thread(target=sync, name="shardfix-fsync")
        syncer.start()
        try:
            again = fd_checksum(self._fd, self._ring[0] if self._ring else None) if verify else expected
        except OSError as e:
            failure.append(e)
            again = expected
        finally:
            syncer.join()
        try:
            if failure:
                raise failure[0]
            os.close(self._fd)
            self._fd = -1
            if again != expected:
                self._cleanup()
                raise OutputError(
                    f"{self.path}: re-read checksum {again} differs from the bytes written ({expected}); "
                    "the disk or filesystem corrupted the write"
                )
            os.replace(self.tmp, self.path)
        except OSError as e:
            self._cleanup()
            raise OutputError(f"{self.path}: cannot finish ({e.strerror})") from e
        return WrittenFile(self.path.name, self._bytes, expected, self._written)

    def _stop_crc(self) -> None:
        pool, self._crc_pool = getattr(self, "_crc_pool", None), None
        if pool is not None:
            pool.shutdown(wait=True)  # no job may still read a buffer we hand back

    def _cleanup(self) -> None:
        self._stop_crc()
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


def fd_checksum(fd: int, buf: memoryview | None = None) -> str:
    """xxh3-128 of a whole open file, read from offset 0 in cache-sized blocks."""
    h = xxhash.xxh3_128()
    buf = buf if buf is not None else memoryview(bytearray(BLOCK))
    offset = 0
    while n := fill_upto(fd, offset, buf):
        h.update(buf[:n])
        offset += n
    return h.hexdigest()


def file_checksum(path: Path) -> str:
    """xxh3-128 of a whole file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return fd_checksum(fd)
    finally:
        os.close(fd)


def json_bytes(obj: object) -> bytes:
    """``obj`` as strict JSON (non-finite floats as strings: no ``NaN`` ever reaches a file), indented."""
    return (json.dumps(strict_value(obj), indent=2, sort_keys=False, allow_nan=False) + "\n").encode()


def write_bytes_atomic(path: Path, data: bytes, hint: str = "") -> None:
    """Write ``data`` to a temporary name beside ``path``, fsync, and rename over ``path``.

    Raises:
        OutputError: naming the file and ``hint`` (what to do), the temporary file removed.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write {len(data)} bytes ({e.strerror}){hint}") from e


def write_json_atomic(path: Path, obj: object) -> None:
    """Write ``obj`` as strict JSON through :func:`write_bytes_atomic`."""
    write_bytes_atomic(path, json_bytes(obj))


def index_json(weight_map: dict[str, str], total_size: int) -> dict[str, object]:
    """The Hugging Face ``*.safetensors.index.json`` document."""
    return {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
