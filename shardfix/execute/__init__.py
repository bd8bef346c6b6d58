"""Run a plan: one task per output file, inline or as Ray tasks, then finish the directory.

A task (:func:`write_file_task`) is a plain function of small, JSON-like arguments: it opens
the source by path and writes its file's tensors, in order, into a safetensors file under
``OUT/.shardfix-staging/``, re-reading the file to check its checksum, and returns a small
result. A tensor that is a plain byte run of the source (no ops, or a vocab trim / fused part:
see :func:`~shardfix.reconcile.ops.byte_window`) whose source can say where its bytes lie
(``byte_ranges``) is copied file to file through a small buffer; any other tensor is read
whole, transformed with the planned ops and written. Only when every file is staged does
:func:`finish` move them into place and write the index files, the param groups and, last,
the report -- so an interrupted run never looks complete, and ``--resume`` reuses staged files
whose checksums still match.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from shardfix.dtypes import itemsize
from shardfix.errors import BadInputError, InternalError, OutputError
from shardfix.io.digest import tensor_digest
from shardfix.io.units import format_bytes
from shardfix.outputs.writer import StreamingWriter, TensorSpec, file_checksum, index_json, write_json_atomic
from shardfix.plan import COMPANIONS, MODEL, OPTIMIZER, OutputFile, OutputTensor, Plan
from shardfix.reconcile.ops import apply_ops, byte_window
from shardfix.report import REPORT_NAME
from shardfix.sources.base import ByteRange

log = logging.getLogger(__name__)

STAGING = ".shardfix-staging"
PARAM_GROUPS_NAME = "optimizer_param_groups.json"
_SOURCES: dict[tuple[str, str, bool], Any] = {}


def _open_cached(path: str, fmt: str, trust_pickle: bool) -> Any:
    from shardfix.sources import open_source

    key = (path, fmt, trust_pickle)
    src = _SOURCES.get(key)
    if src is None:
        if len(_SOURCES) > 4:
            for s in _SOURCES.values():
                s.close()
            _SOURCES.clear()
        src = _SOURCES[key] = open_source(path, fmt, trust_pickle=trust_pickle)
    return src


def drop_cached_sources() -> None:
    """Close the sources tasks of this process opened (the next task reopens them)."""
    for s in _SOURCES.values():
        s.close()
    _SOURCES.clear()


def file_from_dict(d: dict[str, Any]) -> OutputFile:
    return OutputFile(d["name"], d["set"], [OutputTensor(**t) for t in d["tensors"]], d.get("metadata", {}))


def _hooks(ctx: dict[str, Any], name: str) -> float:
    """Test hooks, set from ``SHARDFIX_TEST_*`` variables in the driver; return a delay.

    ``pid_dir``: write ``NAME.pid`` with this process's pid; ``fail_once_dir``: the first
    attempt at each file fails with an I/O error (EIO); ``delay``: seconds to pause after the
    first tensor, so a test can interrupt a task mid-write.
    """
    hooks = ctx.get("hooks") or {}
    if hooks.get("pid_dir"):
        pid_dir = Path(hooks["pid_dir"])
        tmp = pid_dir / f".{name}.pid.tmp-{os.getpid()}"
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, pid_dir / f"{name}.pid")
    if hooks.get("fail_once_dir"):
        marker = Path(hooks["fail_once_dir"]) / f"{name}.failed"
        try:
            marker.touch(exist_ok=False)
        except FileExistsError:
            pass
        else:
            raise OSError(errno.EIO, f"injected I/O error writing {name} (SHARDFIX_TEST_FAIL_ONCE_DIR)")
    return float(hooks.get("delay") or 0)


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
    return done


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

    from shardfix.io.digest import tensor_digest
    from shardfix.outputs.writer import build_header

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


def stream_ranges(src: Any, entries: dict[str, Any], t: OutputTensor) -> list[ByteRange] | None:
    """Where ``t``'s bytes lie in the source files, when it can be copied rather than computed."""
    entry = entries.get(t.source)
    byte_ranges = getattr(src, "byte_ranges", None)
    if getattr(t, "origin", "source") != "source" or entry is None or byte_ranges is None or t.dtype != entry.dtype:
        return None
    window = byte_window(tuple(entry.shape), itemsize(entry.dtype), t.ops)
    if window is None or window[1] - window[0] != t.nbytes:
        return None
    ranges = byte_ranges(t.source)
    return None if ranges is None else clip_ranges(ranges, *window)


def write_file_task(ctx: dict[str, Any], file: dict[str, Any]) -> dict[str, Any]:
    """Write one planned output file into the staging directory; return what was written.

    Args:
        ctx: ``source``, ``format``, ``trust_pickle``, ``staging``, ``device``, ``verify``,
            optionally ``verify_mode`` (``xxh3``: re-read and hash the file on the host;
            ``digest``: re-read and compare per-tensor digests on the device; default
            ``digest`` for cuda) and ``hooks`` (tests).
        file: an :class:`OutputFile` as a dict.
    """
    t0 = time.perf_counter()
    of = file_from_dict(file)
    staging = Path(ctx["staging"])
    again = _staged_here(staging, of)
    if again is not None:
        return {**again, "reused": True}
    delay = _hooks(ctx, of.name)
    device = torch.device(ctx.get("device", "cpu"))
    if device.type == "cuda":
        check_cuda_here()
    verify_mode = ctx.get("verify_mode") or ("digest" if device.type == "cuda" else "xxh3")
    src = _open_cached(ctx["source"], ctx["format"], ctx.get("trust_pickle", False))
    comp = ctx.get("companions")
    specs = [TensorSpec(t.name, t.dtype, tuple(t.shape)) for t in of.tensors]
    digests: dict[str, str] = {}
    read_s = compute_s = 0.0
    streamed = 0
    # tensors that are plain byte runs of the source are copied, not decoded; on a GPU run the
    # per-tensor digests are computed on the device, so every tensor goes through it
    stream = verify_mode == "xxh3"
    last_key: tuple[str, str] | None = None
    last: torch.Tensor | None = None
    entries = {e.key: e for e in src.index.tensors()}
    with StreamingWriter(staging / of.name, specs, of.metadata) as writer:
        for i, t in enumerate(of.tensors):
            ranges = stream_ranges(src, entries, t) if stream else None
            if ranges is not None:
                writer.write_ranges(t.name, t.dtype, tuple(t.shape), ranges)
                streamed += 1
                if delay and i == 0:
                    time.sleep(delay)  # test hook: be mid-write when killed
                continue
            if t.ops and t.ops[0]["op"] == "value":
                tensor = apply_ops(None, t.ops)
                if device.type == "cuda":
                    tensor = tensor.to(device)
            else:
                if (t.origin, t.source) != last_key:
                    last = None  # drop the previous tensor before reading the next
                    r0 = time.perf_counter()
                    reader = src if t.origin == "source" else _open_cached(comp["path"], comp["format"], False)
                    last = reader.read_tensor(t.source)
                    read_s += time.perf_counter() - r0
                    last_key = (t.origin, t.source)
                    if device.type == "cuda":
                        last = last.to(device, non_blocking=False)
                c0 = time.perf_counter()
                tensor = apply_ops(last, t.ops)
                compute_s += time.perf_counter() - c0
            if verify_mode == "digest":
                c0 = time.perf_counter()
                digests[t.name] = tensor_digest(tensor)
                compute_s += time.perf_counter() - c0
            if tensor.device.type != "cpu":
                tensor = tensor.contiguous().cpu()
            writer.write(t.name, tensor)
            del tensor
            if delay and i == 0:
                time.sleep(delay)  # test hook: be mid-write when killed
        last = None
        # xxh3 mode: the file is re-read and re-hashed while the fsync runs (inside finish)
        v0 = time.perf_counter()
        written = writer.finish(verify=ctx.get("verify", True) and verify_mode == "xxh3")
    result = asdict(written)
    result.update(set=of.set, fingerprint=of.fingerprint())
    if ctx.get("verify", True) and verify_mode == "digest":
        try:
            verify_by_digest(staging / of.name, specs, of.metadata, digests, device)
        except OutputError:
            (staging / of.name).unlink(missing_ok=True)
            raise
    result["verified"] = verify_mode if ctx.get("verify", True) else None
    result["seconds"] = round(time.perf_counter() - t0, 4)
    result["read_seconds"] = round(read_s, 4)
    result["compute_seconds"] = round(compute_s, 4)
    result["verify_seconds"] = round(time.perf_counter() - v0, 4)
    result["streamed_tensors"] = streamed
    result["device"] = str(device)
    write_json_atomic(staging / f"{of.name}.done.json", result)
    return result


# -- output directory -------------------------------------------------------------------------


def _is_ours(out: Path) -> bool:
    names = {p.name for p in out.iterdir()}
    return not names or REPORT_NAME in names or STAGING in names


def prepare_output(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Create ``out`` or check it may be used; ``--overwrite`` clears a previous shardfix output."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory; pick another output path")
    if out.is_dir() and any(out.iterdir()):
        if resume:
            return
        if not overwrite:
            raise OutputError(
                f"{out}: already exists and is not empty; pass --overwrite to replace it or --resume to "
                "finish an interrupted conversion"
            )
        if not _is_ours(out):
            raise OutputError(
                f"{out}: holds files shardfix did not write (no {REPORT_NAME}); refusing to delete them "
                "with --overwrite -- pick an empty or new directory"
            )
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create ({e.strerror})") from e


def staged_result(out: Path, of: OutputFile) -> dict[str, Any] | None:
    """A staged file from an earlier run that still matches its plan and checksum, or None."""
    staging = out / STAGING
    sidecar = staging / f"{of.name}.done.json"
    if not sidecar.is_file():
        return None
    try:
        done = json.loads(sidecar.read_text())
    except ValueError:
        return None
    if done.get("fingerprint") != of.fingerprint():
        return None
    for where in (staging / of.name, out / of.name):
        if where.is_file() and file_checksum(where) == done.get("checksum"):
            if where.parent != staging:
                os.replace(where, staging / of.name)
            return done
    return None


# -- executors ----------------------------------------------------------------------------------


#: What ``--executor auto`` weighs, measured with ``scripts/bench`` on the reference machine
#: (2 CPUs, README "Performance"): one process converts a DCP checkpoint at about 1 GB/s
#: (streamed from the page cache to the output disk, fsync included) ...
INLINE_GBPS = 1.0
#: ... while a local Ray instance costs 6-7 s before it has done any work on a quiet machine
#: (``ray.init``, then every worker importing torch, and ~1.5 s to shut down) and 13-22 s on
#: a loaded one.
RAY_START_S = 10.0
#: Parallel file tasks stop paying once the disk is saturated; lacking a measurement of the
#: output disk, assume it absorbs about this many concurrent streams at full speed.
DISK_STREAMS = 4


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_executor(plan: Plan, requested: str, workers: int | None, ray_address: str | None) -> tuple[str, str]:
    """Pick ``inline`` or ``ray`` for ``--executor auto`` and say why.

    ``ray_address`` is the effective address: ``--ray-address`` or ``RAY_ADDRESS``. Otherwise
    Ray is chosen only when its estimated time -- start-up plus the work split over the files
    that can run at once (bounded by CPUs, ``--workers``, files and the disk) -- beats
    converting inline; see :data:`INLINE_GBPS` and :data:`RAY_START_S`.
    """
    if requested != "auto":
        return requested, f"--executor {requested}"
    if ray_address:
        return "ray", f"Ray cluster at {ray_address} (--ray-address or RAY_ADDRESS): run on it"
    n_files = len(plan.files)
    cpus = _usable_cpus()
    gb = plan.total_bytes / 1e9
    inline_s = gb / INLINE_GBPS
    if n_files < 2:
        return "inline", "one output file: nothing to run in parallel (a file is one task)"
    parallel = min(workers or cpus, cpus, n_files, DISK_STREAMS)
    if parallel < 2:
        limit = "--workers 1" if workers == 1 else f"{cpus} usable CPU(s)"
        return "inline", f"{limit}: no parallelism for Ray to add"
    ray_s = RAY_START_S + inline_s / parallel
    estimate = (f"{gb:.2f} GB: ~{inline_s:.0f} s inline at ~{INLINE_GBPS:g} GB/s vs ~{ray_s:.0f} s on Ray "
                f"(~{RAY_START_S:.0f} s to start, then {parallel} files at a time)")
    if ray_s >= inline_s:
        return "inline", estimate
    return "ray", estimate


class Progress:
    """One byte-weighted progress bar on a terminal; a log line every ``interval`` seconds otherwise.

    ``enabled``: True forces the bar, False turns progress output off, None picks by ``isatty``.
    """

    def __init__(self, total: int, enabled: bool | None, *, already: int = 0, interval: float = 10.0,
                 stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.total = max(total + already, 1)
        self.done = already
        self.off = enabled is False
        self.tty = (enabled is True) or (enabled is None and self.stream.isatty())
        self.interval = interval
        self.t0 = time.perf_counter()
        self._last_log = self.t0
        self._fresh = 0  # bytes written by this run (the rate excludes resumed bytes)
        self.width = shutil.get_terminal_size((100, 20)).columns if self.tty else 100

    def advance(self, nbytes: int, label: str) -> None:
        self.done += nbytes
        self._fresh += nbytes
        if self.off:
            return
        frac = min(self.done / self.total, 1.0)
        elapsed = time.perf_counter() - self.t0
        rate = self._fresh / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        if self.tty:
            bar_w = max(10, min(30, self.width - 70))
            bar = "#" * int(frac * bar_w)
            line = (f"[{bar:<{bar_w}}] {frac:6.1%} {format_bytes(self.done, 1)}/{format_bytes(self.total, 1)} "
                    f"{rate / 1e6:7.1f} MB/s eta {left:5.0f}s {label}")
            self.stream.write("\r" + line[: self.width - 1].ljust(self.width - 1))
            self.stream.flush()
        elif time.perf_counter() - self._last_log >= self.interval or frac >= 1.0:
            log.info("progress %.1f%% (%s of %s, %.1f MB/s, eta %.0fs): %s", frac * 100, format_bytes(self.done, 1),
                     format_bytes(self.total, 1), rate / 1e6, left, label)
            self._last_log = time.perf_counter()

    def close(self) -> None:
        if self.tty and not self.off:
            self.stream.write("\n")
            self.stream.flush()


def run_inline(ctx: dict[str, Any], files: list[OutputFile], progress: Progress) -> list[dict[str, Any]]:
    results = []
    for of in files:
        results.append(write_file_task(ctx, asdict(of)))
        progress.advance(of.nbytes, of.name)
    return results


def run_files(
    plan: Plan, ctx: dict[str, Any], files: list[OutputFile], kind: str, workers: int | None,
    ray_address: str | None, progress: Progress, info: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    if kind == "inline" or not files:
        return run_inline(ctx, files, progress)
    from shardfix.execute.ray import run_ray

    return run_ray(ctx, files, workers=workers, address=ray_address, progress=progress, info=info)


# -- finish -------------------------------------------------------------------------------------


def finish(out: Path, plan: Plan, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Move staged files into place and write index files and param groups (not the report)."""
    staging = out / STAGING
    outputs = []
    for of in plan.files:
        os.replace(staging / of.name, out / of.name)
        done = {k: v for k, v in results[of.name].items() if k != "fingerprint"}
        planned = {t.name: t for t in of.tensors}
        for t in done["tensors"]:
            t["source"] = planned[t["name"]].source
            t["ops"] = planned[t["name"]].ops
        outputs.append(done)
    for kind in (MODEL, OPTIMIZER, COMPANIONS):
        fs = plan.files_of(kind)
        if len(fs) > 1:
            weight_map = {t.name: f.name for f in fs for t in f.tensors}
            total = sum(t.nbytes for f in fs for t in f.tensors)
            write_json_atomic(out / f"{kind}.safetensors.index.json", index_json(weight_map, total))
    if plan.param_groups is not None and plan.files_of(OPTIMIZER):
        write_json_atomic(out / PARAM_GROUPS_NAME, {"param_groups": plan.param_groups})
    shutil.rmtree(staging, ignore_errors=True)
    return outputs


def effective_address(opts: Any) -> str | None:
    from shardfix.execute.ray import resolve_address

    return resolve_address(opts.ray_address) if opts.executor != "inline" else None


def check_device(opts: Any) -> None:
    """Fail early (exit 2) when ``--device cuda`` will run on this machine and it has no GPU.

    On a Ray cluster the check is the cluster's GPU count, made once connected.
    """
    if opts.device != "cuda":
        return
    if opts.executor == "inline" or not effective_address(opts):
        check_cuda_here()


def _test_hooks() -> dict[str, Any] | None:
    hooks = {"pid_dir": os.environ.get("SHARDFIX_TEST_PID_DIR"), "delay": os.environ.get("SHARDFIX_TEST_TASK_DELAY"),
             "fail_once_dir": os.environ.get("SHARDFIX_TEST_FAIL_ONCE_DIR")}
    return hooks if any(hooks.values()) else None


def execute(plan: Plan, out: Path, opts: Any) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, float]]:
    """Run ``plan`` into ``out``; return outputs, executor info and timings.

    The caller writes the report (also on failure).
    """
    check_device(opts)
    drop_cached_sources()  # a source opened by an earlier run in this process may have changed since
    staging = out / STAGING
    staging.mkdir(exist_ok=True)
    address = effective_address(opts)
    kind, why = choose_executor(plan, opts.executor, opts.workers, address)
    comp = plan.source.get("companions")
    ctx: dict[str, Any] = {
        "source": str(Path(plan.source["path"]).resolve()), "format": plan.source["format"],
        "trust_pickle": opts.trust_pickle, "staging": str(staging.resolve()), "device": opts.device,
        "verify": opts.verify, "hooks": _test_hooks(),
        "companions": {**comp, "path": str(Path(comp["path"]).resolve())} if comp else None,
    }
    results: dict[str, dict[str, Any]] = {}
    todo: list[OutputFile] = []
    resumed = 0
    for of in plan.files:
        done = staged_result(out, of) if opts.resume else None
        if done is not None:
            results[of.name] = done
            resumed += 1
        else:
            todo.append(of)
    if resumed:
        log.info("resume: %d of %d files already written and verified; writing %d", resumed, len(plan.files), len(todo))
    progress = Progress(sum(f.nbytes for f in todo), opts.progress,
                        already=sum(f.nbytes for f in plan.files if f.name in results))
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        for r in run_files(plan, ctx, todo, kind, opts.workers, address, progress, info):
            results[r["name"]] = r
    finally:
        progress.close()
    t_write = time.perf_counter() - t0
    missing = [f.name for f in plan.files if f.name not in results]
    if missing:
        raise InternalError(f"{len(missing)} output files were not produced: {', '.join(missing[:5])}")
    t1 = time.perf_counter()
    outputs = finish(out, plan, results)
    executor = {"kind": kind, "why": why, "workers": opts.workers, "device": opts.device,
                "resumed_files": resumed, "written_files": len(todo), **info}
    if kind == "ray":
        executor["address"] = address or "local instance"
    return outputs, executor, {"write": round(t_write, 4), "finish": round(time.perf_counter() - t1, 4)}
