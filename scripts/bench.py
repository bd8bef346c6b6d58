"""Benchmark shardfix against the plain-copy I/O limit and the baseline a user would write.

For each checkpoint size, one run times, in alternation (the order rotates every repetition so
page-cache and disk state do not favour one variant):

* ``copy``: copy the checkpoint's files to the output disk and fsync them (the I/O limit);
* ``baseline``: ``dcp_to_torch_save``, ``torch.load``, vocab trim, ``safetensors.torch.save_file``
  for the model and the optimizer state, fsync;
* ``inline``: ``shardfix convert --executor inline``;
* ``auto``: ``shardfix convert`` with the default executor (only when it would not pick inline);
* ``ray1`` / ``rayN``: ``shardfix convert --executor ray --workers 1|N`` (Ray start-up included).

Every variant runs in its own process. ``seconds`` is the work measured inside that process
after its imports (``torch``, ``torch.distributed.checkpoint``, ``shardfix`` or
``safetensors``); ``process_s`` is the whole process from spawn to exit. Peak RSS is sampled
every 20 ms over the process *and all its descendants* (Ray's GCS, raylet and workers
included) and summed; for a single process the kernel's exact peak is used when
higher (``VmHWM``). Throughput is checkpoint bytes per second. Outputs of the conversions are compared
tensor by tensor once per size (shardfix's output must equal the baseline's).

The page cache is not dropped (that needs root): the source is read from memory when it fits,
as it does right after training saves it. ``--cold`` evicts the source files from the page
cache before every run with ``posix_fadvise(DONTNEED)``, which needs no privileges.

Usage: ``scripts/bench [--sizes 0.25,1,2,4] [--reps 3] [--workers N] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("copy", "baseline", "inline", "auto", "ray1", "rayN")
GB = 10**9


# -- the variants, each run in a child process ---------------------------------------------------


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def child_copy(src: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    out.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        if p.is_file():
            shutil.copyfile(p, out / p.name)  # copy_file_range/sendfile: no user-space copy
    _fsync_tree(out)
    return {"seconds": time.perf_counter() - t0}


def child_baseline(src: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    t0 = time.perf_counter()
    out.mkdir(parents=True)
    full = out / "full.pt"
    dcp_to_torch_save(src, full)
    t1 = time.perf_counter()
    sd = torch.load(full, weights_only=True)
    t2 = time.perf_counter()

    def trim(name: str, t: torch.Tensor) -> torch.Tensor:  # what --vocab-size does
        return t[: args.vocab].contiguous() if t.dim() and name.startswith(("embed.", "lm_head.")) else t

    save_file({k: trim(k, v) for k, v in sd["model"].items()}, out / "model.safetensors")
    optim = {f"state.{p}.{n}": trim(p, v) for p, st in sd["optim"]["state"].items() for n, v in st.items()}
    save_file(optim, out / "optimizer.safetensors")
    t3 = time.perf_counter()
    del sd, optim
    full.unlink()
    _fsync_tree(out)
    t4 = time.perf_counter()
    return {"seconds": t4 - t0, "phases": {"dcp_to_torch_save": t1 - t0, "torch_load": t2 - t1,
                                           "save_file": t3 - t2, "fsync": t4 - t3}}


def child_shardfix(src: Path, out: Path, args: argparse.Namespace, executor: str, workers: int | None) -> dict[str, Any]:
    import torch.distributed.checkpoint  # noqa: F401 - the baseline pays this import before its clock too

    from shardfix.api import convert
    from shardfix.options import ConvertOptions

    opts = ConvertOptions(vocab_size=args.vocab, executor=executor, workers=workers, progress=False,
                          max_shard_size=args.max_shard_size)
    t0 = time.perf_counter()
    report = convert(src, out, opts)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "phases": report["timings"], "executor": report["executor"]}


def run_child(args: argparse.Namespace) -> None:
    src, out = Path(args.src), Path(args.out)
    variant = args.child
    if variant == "copy":
        result = child_copy(src, out, args)
    elif variant == "baseline":
        result = child_baseline(src, out, args)
    elif variant == "inline":
        result = child_shardfix(src, out, args, "inline", None)
    elif variant == "auto":
        result = child_shardfix(src, out, args, "auto", None)
    elif variant == "ray1":
        result = child_shardfix(src, out, args, "ray", 1)
    elif variant == "rayN":
        result = child_shardfix(src, out, args, "ray", args.workers)
    else:
        raise SystemExit(f"unknown variant {variant}")
    # The kernel's peak for this process image. Not ru_maxrss: after fork + exec that still
    # carries the forking parent's peak (the driver has torch imported).
    with open("/proc/self/status") as f:
        hwm = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
    result["own_peak_rss"] = hwm
    print("BENCH-RESULT " + json.dumps(result), flush=True)


# -- the driver ---------------------------------------------------------------------------------


PAGE = os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's list: a child's parent may be any thread)."""
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(k) for k in f.read().split())
    except OSError:
        pass
    return kids


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


class TreeRss:
    """Sample the summed RSS of a process and all its descendants in a background thread (/proc)."""

    def __init__(self, pid: int, interval: float = 0.02, rescan: float = 0.1) -> None:
        self.root = pid
        self.interval, self.rescan = interval, rescan
        self.peak = 0
        self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        seen, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            seen.append(pid)
            todo.extend(_children(pid))
        return seen

    def _run(self) -> None:
        procs, last_scan = [self.root], 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now - last_scan > self.rescan:  # walking the tree costs more than reading RSS
                procs, last_scan = self._tree(), now
            total = sum(_rss(p) for p in procs)
            if total > self.peak:
                self.peak, self.peak_procs = total, len(procs)
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def evict(path: Path) -> None:
    """Drop ``path``'s files from the page cache (clean pages only; no privileges needed)."""
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_variant(variant: str, src: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    if out.exists():
        shutil.rmtree(out)
    if args.cold:
        evict(src)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--src", str(src), "--out", str(out),
           "--vocab", str(args.vocab), "--workers", str(args.workers), "--max-shard-size", str(args.max_shard_size)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    sampler = TreeRss(proc.pid)
    stdout, stderr = proc.communicate()
    process_s = time.perf_counter() - t0
    peak = sampler.stop()
    line = next((ln for ln in stdout.splitlines() if ln.startswith("BENCH-RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{variant} failed (exit {proc.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    result = json.loads(line.split(" ", 1)[1])
    single = variant in ("copy", "baseline", "inline") or result.get("executor", {}).get("kind") == "inline"
    result["peak_rss"] = max(peak, result["own_peak_rss"]) if single else peak
    result["process_s"] = process_s
    return result


def checkpoint_bytes(src: Path) -> int:
    return sum(p.stat().st_size for p in src.iterdir() if p.is_file())


def compare_outputs(a: Path, b: Path) -> str:
    """Compare every tensor of two output directories bit for bit; return a one-line verdict."""
    import torch
    from safetensors import safe_open

    def tensors(d: Path) -> dict[str, tuple[Path, str]]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                out.update({k: (f, k) for k in h.keys()})
        return out

    ta, tb = tensors(a), tensors(b)
    if set(ta) != set(tb):
        return f"DIFFERENT key sets ({len(set(ta) ^ set(tb))} differ)"
    for k, (fa, _) in ta.items():
        with safe_open(fa, "pt") as ha, safe_open(tb[k][0], "pt") as hb:
            x, y = ha.get_tensor(k), hb.get_tensor(k)
        same = x.dtype == y.dtype and x.shape == y.shape
        if not same or not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            return f"DIFFERENT: {k}"
    return f"identical ({len(ta)} tensors)"


def machine() -> dict[str, Any]:
    import torch

    cpu = "unknown"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = None
    mem = os.sysconf("SC_PHYS_PAGES") * PAGE
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray_version, "loadavg_at_start": os.getloadavg()}


def fmt_table(rows: list[dict[str, Any]]) -> str:
    head = ("| size | variant | time (s) | process (s) | GB/s | peak RSS (GB) | time / copy | baseline / time |\n"
            "|---:|---|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in rows:
        lines.append(
            f"| {r['size_gb']:g} GB | {r['variant']} | {r['seconds']:.2f} | {r['process_s']:.2f} | {r['gb_per_s']:.2f} | "
            f"{r['peak_rss'] / GB:.2f} | {r['vs_copy']:.2f}x | {r['baseline_over']:.1f}x |"
        )
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1", help="checkpoint sizes in GB, comma separated (default 1)")
    p.add_argument("--src", help="benchmark this existing DCP checkpoint instead of generating one")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="N for the rayN variant")
    p.add_argument("--variants", default="copy,baseline,inline,auto,ray1,rayN")
    p.add_argument("--work", default="/tmp/shardfix-bench", help="scratch directory (checkpoints and outputs)")
    p.add_argument("--json", default="bench-out/bench.json", help="where to write the results")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--vocab", type=int, default=None, help="true vocab (default: the generator's, 50257)")
    p.add_argument("--cold", action="store_true", help="evict the source from the page cache before every run")
    p.add_argument("--keep", action="store_true", help="keep generated checkpoints (reused by later runs)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:  # imports nothing heavy: the copy variant must not pay for torch
        run_child(args)
        return 0
    from shardfix.examples.synthetic import VOCAB, make_checkpoint

    args.vocab = args.vocab or VOCAB

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    jobs: list[tuple[float, Path, bool]] = []
    if args.src:
        src = Path(args.src)
        jobs.append((checkpoint_bytes(src) / GB, src, False))
    else:
        for s in args.sizes.split(","):
            jobs.append((float(s), work / f"ckpt-{float(s):g}GB", True))

    info = machine()
    print(f"machine: {info['cpus']} CPUs ({info['cpu']}), {info['memory_gib']} GiB, torch {info['torch']}, "
          f"ray {info['ray']}; load average {info['loadavg_at_start']}", flush=True)
    rows: list[dict[str, Any]] = []
    all_runs: list[dict[str, Any]] = []
    for size_gb, src, generated in jobs:
        if generated and not (src / ".metadata").is_file():
            t0 = time.perf_counter()
            make_checkpoint(src, int(size_gb * GB))
            print(f"generated {src} in {time.perf_counter() - t0:.1f} s", flush=True)
        nbytes = checkpoint_bytes(src)
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for rep in range(args.reps):
            order = variants[rep % len(variants):] + variants[: rep % len(variants)]
            for v in order:
                out = work / f"out-{v}"
                r = run_variant(v, src, out, args)
                runs[v].append(r)
                all_runs.append({"size_gb": size_gb, "variant": v, "rep": rep, **r})
                print(f"  {size_gb:g} GB rep {rep + 1}/{args.reps} {v:8s} {r['seconds']:7.2f} s "
                      f"(process {r['process_s']:6.2f} s)  peak RSS {r['peak_rss'] / GB:5.2f} GB", flush=True)
                if rep == 0 and v in ("baseline", "inline"):
                    shutil.copytree(out, work / f"keep-{v}", dirs_exist_ok=True)
                shutil.rmtree(out, ignore_errors=True)
        verdict = None
        if (work / "keep-baseline").is_dir() and (work / "keep-inline").is_dir():
            verdict = compare_outputs(work / "keep-baseline", work / "keep-inline")
            print(f"  shardfix output vs baseline output: {verdict}", flush=True)
        for d in ("keep-baseline", "keep-inline"):
            shutil.rmtree(work / d, ignore_errors=True)
        med = {v: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "process_s", "peak_rss")}
               for v, rs in runs.items()}
        for v in variants:
            m = med[v]
            rows.append({
                "size_gb": size_gb, "bytes": nbytes, "variant": v, **m,
                "gb_per_s": nbytes / GB / m["seconds"],
                "vs_copy": m["seconds"] / med["copy"]["seconds"] if "copy" in med else float("nan"),
                "baseline_over": med["baseline"]["seconds"] / m["seconds"] if "baseline" in med else float("nan"),
                "executor": runs[v][0].get("executor", {}).get("kind"),
                "executor_why": runs[v][0].get("executor", {}).get("why"),
                "output_check": verdict,
            })
        if generated and not args.keep:
            shutil.rmtree(src, ignore_errors=True)
    table = fmt_table(rows)
    print()
    print(table)
    config = {k: v for k, v in vars(args).items() if k not in ("child", "out")}
    doc = {"machine": info, "config": config, "results": rows, "runs": all_runs, "table_markdown": table}
    path = Path(args.json)
    if not path.is_absolute():
        path = ROOT / path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
