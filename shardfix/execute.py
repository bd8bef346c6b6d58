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

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from shardfix.dtypes import itemsize
from shardfix.errors import BadInputError, InternalError, OutputError
from shardfix.plan import COMPANIONS, MODEL, OPTIMIZER, OutputFile, OutputTensor, Plan
from shardfix.reconcile.ops import apply_ops, byte_window
from shardfix.report import REPORT_NAME
from shardfix.safetensors_io import StreamingWriter, TensorSpec, file_checksum, index_json, write_json_atomic
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
        ctx: ``source``, ``format``, ``trust_pickle``, ``staging``, ``device``, ``verify``.
        file: an :class:`OutputFile` as a dict.
    """
    t0 = time.perf_counter()
    of = file_from_dict(file)
    src = _open_cached(ctx["source"], ctx["format"], ctx.get("trust_pickle", False))
    comp = ctx.get("companions")
    device = torch.device(ctx.get("device", "cpu"))
    staging = Path(ctx["staging"])
    specs = [TensorSpec(t.name, t.dtype, tuple(t.shape)) for t in of.tensors]
    read_s = 0.0
    streamed = 0
    last_key: tuple[str, str] | None = None
    last: torch.Tensor | None = None
    entries = {e.key: e for e in src.index.tensors()}
    with StreamingWriter(staging / of.name, specs, of.metadata) as writer:
        for t in of.tensors:
            ranges = stream_ranges(src, entries, t)
            if ranges is not None:
                writer.write_ranges(t.name, t.dtype, tuple(t.shape), ranges)
                streamed += 1
                continue
            if t.ops and t.ops[0]["op"] == "value":
                tensor = apply_ops(None, t.ops)
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
                tensor = apply_ops(last, t.ops)
                if device.type == "cuda":
                    tensor = tensor.contiguous().cpu()
            writer.write(t.name, tensor)
            del tensor
        last = None
        written = writer.finish(verify=ctx.get("verify", True))
    result = asdict(written)
    result.update(set=of.set, fingerprint=of.fingerprint())
    result["seconds"] = round(time.perf_counter() - t0, 4)
    result["read_seconds"] = round(read_s, 4)
    result["streamed_tensors"] = streamed
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

    Ray is chosen only when its estimated time -- start-up plus the work split over the files
    that can run at once (bounded by CPUs, ``--workers``, files and the disk) -- beats
    converting inline; see :data:`INLINE_GBPS` and :data:`RAY_START_S`.
    """
    if requested != "auto":
        return requested, f"--executor {requested}"
    if ray_address:
        return "ray", "--ray-address given: run on that cluster"
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
    """One byte-weighted progress line on a terminal; periodic log lines otherwise."""

    def __init__(self, total: int, enabled: bool | None) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.tty = sys.stderr.isatty() if enabled is None else enabled
        self.t0 = time.perf_counter()
        self._last_log = self.t0

    def advance(self, nbytes: int, label: str) -> None:
        self.done += nbytes
        frac = min(self.done / self.total, 1.0)
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed / 1e6 if elapsed > 0 else 0.0
        if self.tty:
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r[{bar:<30}] {frac:6.1%} {rate:8.1f} MB/s {label[:40]:<40}")
            sys.stderr.flush()
        elif time.perf_counter() - self._last_log > 10 or frac >= 1.0:
            log.info("progress %.1f%% (%d/%d bytes, %.1f MB/s): %s", frac * 100, self.done, self.total, rate, label)
            self._last_log = time.perf_counter()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def run_inline(ctx: dict[str, Any], files: list[OutputFile], progress: Progress) -> list[dict[str, Any]]:
    results = []
    for of in files:
        results.append(write_file_task(ctx, asdict(of)))
        progress.advance(of.nbytes, of.name)
    return results


def run_files(
    plan: Plan, ctx: dict[str, Any], files: list[OutputFile], kind: str, workers: int | None,
    ray_address: str | None, progress: Progress,
) -> list[dict[str, Any]]:
    if kind == "inline" or not files:
        return run_inline(ctx, files, progress)
    from shardfix.ray_exec import run_ray

    return run_ray(ctx, files, workers=workers, address=ray_address, progress=progress)


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


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda: no CUDA GPU is visible to torch here; use --device cpu")


def execute(plan: Plan, out: Path, opts: Any) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, float]]:
    """Run ``plan`` into ``out``; return outputs, executor info and timings.

    The caller writes the report (also on failure).
    """
    check_device(opts.device)
    drop_cached_sources()  # a source opened by an earlier run in this process may have changed since
    staging = out / STAGING
    staging.mkdir(exist_ok=True)
    kind, why = choose_executor(plan, opts.executor, opts.workers, opts.ray_address)
    ctx = {
        "source": plan.source["path"], "format": plan.source["format"], "trust_pickle": opts.trust_pickle,
        "staging": str(staging), "device": opts.device, "verify": opts.verify,
        "companions": plan.source.get("companions"),
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
    progress = Progress(sum(f.nbytes for f in todo), opts.progress)
    t0 = time.perf_counter()
    try:
        for r in run_files(plan, ctx, todo, kind, opts.workers, opts.ray_address, progress):
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
                "resumed_files": resumed, "written_files": len(todo)}
    return outputs, executor, {"write": round(t_write, 4), "finish": round(time.perf_counter() - t1, 4)}
