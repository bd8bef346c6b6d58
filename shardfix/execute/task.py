"""The task body: write one planned output file into the staging directory and say what was written.

:func:`write_file_task` is a plain function of a :class:`~shardfix.execute.context.TaskContext` and
one output file (as a dict): it opens the source by path and writes the file's tensors, in order,
into a safetensors file under ``OUT/.shardfix-staging/``, re-reading it to check its checksum. A
tensor that is a plain byte run of the source (no ops, or a vocab trim / fused part: see
:func:`~shardfix.reconcile.ops.byte_window`) whose source can say where its bytes lie
(``byte_ranges``) is copied file to file through a small buffer; any other tensor is read whole,
transformed with the planned ops and written. Executors (inline, Ray) call it; tests call it directly.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from shardfix.dtypes import itemsize
from shardfix.errors import BadInputError, OutputError
from shardfix.execute.context import Faults, TaskContext
from shardfix.io.digest import tensor_digest
from shardfix.layouts import open_checkpoint
from shardfix.outputs.writer import StreamingWriter, TensorSpec, build_header, file_checksum, write_json_atomic
from shardfix.plan import OutputFile, OutputTensor
from shardfix.reconcile.ops import apply_ops, byte_window, is_value
from shardfix.sources.base import ByteRange, Source, TensorEntry

_SOURCES: dict[tuple[str, str, bool], Source] = {}


def _open_cached(path: str, fmt: str, trust_pickle: bool) -> Source:
    key = (path, fmt, trust_pickle)
    src = _SOURCES.get(key)
    if src is None:
        if len(_SOURCES) > 4:
            drop_cached_sources()
        src = _SOURCES[key] = open_checkpoint(path, fmt, trust_pickle=trust_pickle)
    return src


def drop_cached_sources() -> None:
    """Close the sources tasks of this process opened (the next task reopens them)."""
    for s in _SOURCES.values():
        s.close()
    _SOURCES.clear()


def file_from_dict(d: dict[str, Any]) -> OutputFile:
    return OutputFile(d["name"], d["set"], [OutputTensor(**t) for t in d["tensors"]], d.get("metadata", {}),
                      d.get("source_identity", ""))


def _inject_faults(faults: Faults | None, name: str) -> float:
    """Apply the test-only faults of the context for file ``name``; return the delay to pause after a tensor."""
    if faults is None:
        return 0.0
    if faults.pid_dir:
        pid_dir = Path(faults.pid_dir)
        tmp = pid_dir / f".{name}.pid.tmp-{os.getpid()}"
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, pid_dir / f"{name}.pid")
    if faults.fail_once_dir:
        marker = Path(faults.fail_once_dir) / f"{name}.failed"
        try:
            marker.touch(exist_ok=False)
        except FileExistsError:
            pass
        else:
            raise OSError(errno.EIO, f"injected I/O error writing {name} (Faults.fail_once_dir)")
    return float(faults.delay or 0)


def _staged_here(staging: Path, of: OutputFile) -> dict[str, Any] | None:
    """A file this run already staged (a task rerun after its worker died), else None."""
    sidecar = staging / f"{of.name}.done.json"
    if not sidecar.is_file() or not (staging / of.name).is_file():
        return None
    try:
        done = json.loads(sidecar.read_text())
    except ValueError:
        return None
    if done.get("fingerprint") != of.fingerprint() or file_checksum(staging / of.name) != done.get("checksum"):
        return None
    return dict(done)


def check_cuda_here() -> None:
    if not torch.cuda.is_available():
        raise BadInputError(
            f"--device cuda: no CUDA GPU is visible to torch on {socket.gethostname()} "
            f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
            "use --device cpu, or run where a GPU and a CUDA build of torch are available"
        )


def verify_by_digest(path: Path, specs: list[TensorSpec], metadata: dict[str, str], digests: dict[str, str],
                     device: torch.device) -> None:
    """Re-read ``path``: header bytes compared on the host, each tensor's digest computed on ``device``."""
    from safetensors import safe_open

    header = build_header(specs, metadata)
    with path.open("rb") as f:
        if f.read(len(header)) != header:
            raise OutputError(f"{path}: re-read header differs from the one written; the disk or filesystem "
                              "corrupted the write")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for s in specs:
            again = tensor_digest(f.get_tensor(s.name).to(device))
            if again != digests[s.name]:
                raise OutputError(f"{path}: tensor {s.name} re-read with digest {again}, written as "
                                  f"{digests[s.name]}; the copy from {device} or the write was corrupted")


def clip_ranges(ranges: list[ByteRange], start: int, stop: int) -> list[ByteRange]:
    """The part ``[start, stop)`` of the concatenation of ``ranges``."""
    out, pos = [], 0
    for r in ranges:
        lo, hi = max(start, pos), min(stop, pos + r.nbytes)
        if lo < hi:
            out.append(r._replace(offset=r.offset + lo - pos, nbytes=hi - lo))
        pos += r.nbytes
    return out


def stream_ranges(src: Source, entries: dict[str, TensorEntry], t: OutputTensor) -> list[ByteRange] | None:
    """Where ``t``'s bytes lie in the source files, when it can be copied rather than computed."""
    entry = entries.get(t.source)
    byte_ranges = getattr(src, "byte_ranges", None)
    if t.origin != "source" or entry is None or byte_ranges is None or t.dtype != entry.dtype:
        return None
    window = byte_window(tuple(entry.shape), itemsize(entry.dtype), t.ops)
    if window is None or window[1] - window[0] != t.nbytes:
        return None
    ranges = byte_ranges(t.source)
    return None if ranges is None else clip_ranges(ranges, *window)


@dataclass(slots=True)
class _FileWriter:
    """The state of writing one file: the source, the last tensor read (reused by split parts), timings."""

    ctx: TaskContext
    src: Source
    device: torch.device
    digests: dict[str, str] = field(default_factory=dict)
    read_s: float = 0.0
    compute_s: float = 0.0
    streamed: int = 0
    last_key: tuple[str, str] | None = None
    last: torch.Tensor | None = None

    def _reader(self, origin: str) -> Source:
        comp = self.ctx.companions
        if origin == "source" or comp is None:
            return self.src
        return _open_cached(comp.path, comp.format, False)

    def tensor(self, t: OutputTensor) -> torch.Tensor:
        """Read (or reuse) ``t``'s source tensor and apply its ops, on the task's device."""
        if is_value(t.ops):
            made = apply_ops(None, t.ops)
            return made.to(self.device) if self.device.type == "cuda" else made
        if (t.origin, t.source) != self.last_key:
            self.last = None  # drop the previous tensor before reading the next
            r0 = time.perf_counter()
            last = self._reader(t.origin).read_tensor(t.source)
            self.read_s += time.perf_counter() - r0
            self.last_key = (t.origin, t.source)
            self.last = last.to(self.device, non_blocking=False) if self.device.type == "cuda" else last
        c0 = time.perf_counter()
        out = apply_ops(self.last, t.ops)
        self.compute_s += time.perf_counter() - c0
        return out

    def write_all(self, of: OutputFile, writer: StreamingWriter, delay: float) -> None:
        stream = self.ctx.effective_verify_mode == "xxh3"  # on a GPU run every tensor goes through the device
        entries = {e.key: e for e in self.src.index.tensors()}
        for i, t in enumerate(of.tensors):
            ranges = stream_ranges(self.src, entries, t) if stream else None
            if ranges is not None:
                writer.write_ranges(t.name, t.dtype, tuple(t.shape), ranges)
                self.streamed += 1
            else:
                tensor = self.tensor(t)
                if self.ctx.effective_verify_mode == "digest":
                    c0 = time.perf_counter()
                    self.digests[t.name] = tensor_digest(tensor)
                    self.compute_s += time.perf_counter() - c0
                writer.write(t.name, tensor.contiguous().cpu() if tensor.device.type != "cpu" else tensor)
                del tensor
            if delay and i == 0:
                time.sleep(delay)  # fault injection: be mid-write when killed
        self.last = None


def write_file_task(ctx: TaskContext, file: dict[str, Any]) -> dict[str, Any]:
    """Write one planned output file into the staging directory; return what was written.

    Args:
        ctx: the run's :class:`TaskContext`.
        file: an :class:`OutputFile` as a dict (``dataclasses.asdict``).
    """
    t0 = time.perf_counter()
    of = file_from_dict(file)
    staging = Path(ctx.staging)
    again = _staged_here(staging, of)
    if again is not None:
        return {**again, "reused": True}
    delay = _inject_faults(ctx.faults, of.name)
    device = torch.device(ctx.device)
    if device.type == "cuda":
        check_cuda_here()
    mode = ctx.effective_verify_mode
    fw = _FileWriter(ctx, _open_cached(ctx.source, ctx.format, ctx.trust_pickle), device)
    specs = [TensorSpec(t.name, t.dtype, tuple(t.shape)) for t in of.tensors]
    with StreamingWriter(staging / of.name, specs, of.metadata) as writer:
        fw.write_all(of, writer, delay)
        v0 = time.perf_counter()
        # xxh3 mode: the file is re-read and re-hashed while the fsync runs (inside finish)
        written = writer.finish(verify=ctx.verify and mode == "xxh3")
    result = asdict(written)
    result.update(name=of.name, set=of.set, fingerprint=of.fingerprint())  # of.name may have a folder (adapter/)
    if ctx.verify and mode == "digest":
        try:
            verify_by_digest(staging / of.name, specs, of.metadata, fw.digests, device)
        except OutputError:
            (staging / of.name).unlink(missing_ok=True)
            raise
    result.update(verified=mode if ctx.verify else None, seconds=round(time.perf_counter() - t0, 4),
                  read_seconds=round(fw.read_s, 4), compute_seconds=round(fw.compute_s, 4),
                  verify_seconds=round(time.perf_counter() - v0, 4), streamed_tensors=fw.streamed, device=str(device))
    write_json_atomic(staging / f"{of.name}.done.json", result)
    return result
