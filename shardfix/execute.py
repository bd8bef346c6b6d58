"""Run a plan: one task per output file, inline or as Ray tasks, then finish the directory.

A task (:func:`write_file_task`) is a plain function of small, JSON-like arguments: it opens
the source by path, reads the tensors its file needs one at a time, applies the planned ops,
streams them into a safetensors file under ``OUT/.shardfix-staging/``, re-reads the file to
check its checksum, and returns a small result. Only when every file is staged does
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

from shardfix.errors import BadInputError, InternalError, OutputError
from shardfix.plan import COMPANIONS, MODEL, OPTIMIZER, OutputFile, OutputTensor, Plan
from shardfix.reconcile.ops import apply_ops
from shardfix.report import REPORT_NAME
from shardfix.safetensors_io import StreamingWriter, TensorSpec, file_checksum, index_json, write_json_atomic

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
    last_key: tuple[str, str] | None = None
    last: torch.Tensor | None = None
    with StreamingWriter(staging / of.name, specs, of.metadata) as writer:
        for t in of.tensors:
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
        written = writer.finish()
    result = asdict(written)
    result.update(set=of.set, fingerprint=of.fingerprint())
    if ctx.get("verify", True):
        again = file_checksum(staging / of.name)
        if again != written.checksum:
            (staging / of.name).unlink(missing_ok=True)
            raise OutputError(
                f"{staging / of.name}: re-read checksum {again} differs from the bytes written "
                f"({written.checksum}); the disk or filesystem corrupted the write"
            )
    result["seconds"] = round(time.perf_counter() - t0, 4)
    result["read_seconds"] = round(read_s, 4)
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


def choose_executor(plan: Plan, requested: str, workers: int | None, ray_address: str | None) -> tuple[str, str]:
    """Pick ``inline`` or ``ray`` for ``--executor auto`` and say why."""
    if requested != "auto":
        return requested, f"--executor {requested}"
    if ray_address:
        return "ray", "--ray-address given: run on that cluster"
    n_files = len(plan.files)
    cpus = os.cpu_count() or 1
    if n_files < 2:
        return "inline", "one output file: nothing to run in parallel"
    if (workers or cpus) < 3 or cpus < 3:
        return "inline", (f"{cpus} CPUs: conversion is bound by memory copies and disk, and starting Ray "
                          "(several seconds and ~1 GB) would cost more than it saves")
    if plan.total_bytes < 2 * 10**9:
        return "inline", f"{plan.total_bytes / 1e9:.2f} GB: less than Ray's start-up would save"
    return "ray", f"{plan.total_bytes / 1e9:.2f} GB over {n_files} files on {cpus} CPUs: parallel tasks"


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
