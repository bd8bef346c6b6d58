"""Benchmark shardfix against the plain-copy I/O limit and the baseline a user of each format would write.

For each source format (``--formats``, see ``benchlib/formats.py``) and checkpoint size, one run
generates a checkpoint in that format and times, in alternation (the order rotates every repetition
so page-cache and disk state do not favour one variant):

* ``copy``: copy the checkpoint's files to the output disk and fsync them (the I/O limit);
* ``baseline``: the format's own tools, then ``safetensors.torch.save_file``, fsync (``benchlib/baselines.py``);
* ``inline``: ``shardfix convert --executor inline``;
* ``auto``: ``shardfix convert`` with the default executor;
* ``ray1`` / ``rayN`` (DCP only): ``shardfix convert --executor ray --workers 1|N`` (Ray start-up included).

Every variant runs in its own process. ``seconds`` is the work measured inside that process after
its imports; ``process_s`` is the whole process from spawn to exit. Peak RSS is sampled every 20 ms
over the process *and all its descendants* and summed; for a single process the kernel's exact peak
is used when higher (``VmHWM``). Throughput is checkpoint bytes per second. Once per format and size
shardfix's output is compared with the baseline's tensor by tensor (model tensors must be equal; a
mismatch is printed and makes the exit status 1).

The page cache is not dropped (that needs root): the source is read from memory when it fits, as
right after training saves it. ``--cold`` evicts the source files with ``posix_fadvise(DONTNEED)``.

Usage: ``scripts/bench [--formats dcp,deepspeed,...|all] [--sizes 0.25,1] [--reps 3] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from benchlib.measure import GB, TreeRss, checkpoint_bytes, copy_checkpoint, evict, own_peak_rss  # noqa: E402

VARIANTS = ("copy", "baseline", "inline", "auto", "ray1", "rayN")
RAY = ("ray1", "rayN")


# -- the variants, each run in a child process ---------------------------------------------------


def child_shardfix(src: Path, out: Path, args: argparse.Namespace, executor: str, workers: int | None) -> dict[str, Any]:
    import torch.distributed.checkpoint  # noqa: F401 - the baselines pay this import before their clock too
    from benchlib.formats import FORMATS

    from shardfix.api import convert
    from shardfix.options import ConvertOptions

    fmt = FORMATS[args.format]
    opts = ConvertOptions(vocab_size=args.vocab if fmt.vocab else None, executor=executor, workers=workers,
                          progress=False, max_shard_size=args.max_shard_size, **fmt.options(src))
    t0 = time.perf_counter()
    report = convert(src, out, opts)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "phases": report["timings"], "executor": report["executor"],
            "warnings": report["warnings"]}


def run_child(args: argparse.Namespace) -> None:
    src, out = Path(args.src), Path(args.out)
    variant = args.child
    if variant == "copy":  # imports nothing heavy: the copy must not pay for torch
        result = copy_checkpoint(src, out)
    elif variant == "baseline":
        from benchlib.formats import FORMATS

        out.mkdir(parents=True)
        result = FORMATS[args.format].baseline(src, out, args.vocab)
    else:
        executor, workers = {"inline": ("inline", None), "auto": ("auto", None), "ray1": ("ray", 1),
                             "rayN": ("ray", args.workers)}[variant]
        result = child_shardfix(src, out, args, executor, workers)
    result["own_peak_rss"] = own_peak_rss()
    print("BENCH-RESULT " + json.dumps(result), flush=True)


def run_generate(args: argparse.Namespace) -> None:
    from benchlib.formats import FORMATS, generate

    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    src = generate(FORMATS[args.format], work, int(args.size_bytes))
    print("BENCH-SRC " + str(src), flush=True)


# -- the driver ---------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "scripts"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _spawn(cmd: list[str], tag: str, what: str) -> tuple[str, float, int]:
    """Run ``cmd`` with its process tree's RSS sampled; return (the ``tag`` line's payload, seconds, peak)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    sampler = TreeRss(proc.pid)
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - t0
    peak = sampler.stop()
    line = next((ln for ln in stdout.splitlines() if ln.startswith(tag + " ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return line.split(" ", 1)[1], seconds, peak


def run_variant(fmt: str, variant: str, src: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    if out.exists():
        shutil.rmtree(out)
    if args.cold:
        evict(src)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--format", fmt, "--src", str(src),
           "--out", str(out), "--workers", str(args.workers), "--max-shard-size", str(args.max_shard_size)]
    if args.vocab:
        cmd += ["--vocab", str(args.vocab)]
    payload, process_s, peak = _spawn(cmd, "BENCH-RESULT", f"{fmt} {variant}")
    result = json.loads(payload)
    single = variant in ("copy", "baseline", "inline") or result.get("executor", {}).get("kind") == "inline"
    result["peak_rss"] = max(peak, result["own_peak_rss"]) if single else peak
    result["process_s"] = process_s
    return result


def obtain_source(fmt: str, size_gb: float, args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The checkpoint to time: ``--src``, a kept one, or a new one (generated in its own process)."""
    if args.src:
        return Path(args.src), None
    work = Path(args.work) / f"src-{fmt}-{size_gb:g}GB"
    marker = work / "bench-src.txt"
    if marker.is_file():
        return Path(marker.read_text().strip()), work
    shutil.rmtree(work, ignore_errors=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--generate", "--format", fmt, "--out", str(work),
           "--size-bytes", str(int(size_gb * GB))]
    payload, seconds, peak = _spawn(cmd, "BENCH-SRC", f"generating {fmt} {size_gb:g} GB")
    marker.write_text(payload)
    print(f"generated {fmt} {size_gb:g} GB in {seconds:.1f} s (peak RSS {peak / GB:.2f} GB): {payload}", flush=True)
    return Path(payload), work


def bench_one(fmt: str, size_gb: float, variants: list[str], args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Every variant of one format and size, ``--reps`` times in rotating order; rows of medians and all runs."""
    from benchlib.compare import compare_outputs
    from benchlib.formats import FORMATS

    src, generated = obtain_source(fmt, size_gb, args)
    nbytes = checkpoint_bytes(src)
    work = Path(args.work)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    all_runs = []
    for rep in range(args.reps):
        for v in variants[rep % len(variants):] + variants[: rep % len(variants)]:
            out = work / f"out-{v}"
            r = run_variant(fmt, v, src, out, args)
            runs[v].append(r)
            all_runs.append({"format": fmt, "size_gb": size_gb, "variant": v, "rep": rep, **r})
            print(f"  {fmt} {size_gb:g} GB rep {rep + 1}/{args.reps} {v:8s} {r['seconds']:7.2f} s "
                  f"(process {r['process_s']:6.2f} s)  peak RSS {r['peak_rss'] / GB:5.2f} GB", flush=True)
            if rep == 0 and v in ("baseline", "inline"):
                shutil.rmtree(work / f"keep-{v}", ignore_errors=True)
                shutil.move(out, work / f"keep-{v}")
            shutil.rmtree(out, ignore_errors=True)
    check = None
    if (work / "keep-baseline").is_dir() and (work / "keep-inline").is_dir():
        check = compare_outputs(work / "keep-baseline", work / "keep-inline", FORMATS[fmt].expect)
        print(f"  {fmt} {size_gb:g} GB: shardfix output vs baseline output: {check['verdict']}", flush=True)
    for d in ("keep-baseline", "keep-inline"):
        shutil.rmtree(work / d, ignore_errors=True)
    if generated and not args.keep:
        shutil.rmtree(generated, ignore_errors=True)
    return summarize(fmt, size_gb, nbytes, runs, check), all_runs


def summarize(fmt: str, size_gb: float, nbytes: int, runs: dict[str, list[dict]], check: dict | None) -> list[dict]:
    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "process_s", "peak_rss")} for v, rs in runs.items()}
    rows = []
    for v, m in med.items():
        rows.append({
            "format": fmt, "size_gb": size_gb, "bytes": nbytes, "variant": v, **m,
            "gb_per_s": nbytes / GB / m["seconds"],
            "vs_copy": m["seconds"] / med["copy"]["seconds"] if "copy" in med else float("nan"),
            "baseline_over": med["baseline"]["seconds"] / m["seconds"] if "baseline" in med else float("nan"),
            "executor": runs[v][0].get("executor", {}).get("kind"),
            "executor_why": runs[v][0].get("executor", {}).get("why"),
            "output_check": check,
        })
    return rows


def fmt_table(rows: list[dict[str, Any]]) -> str:
    head = ("| format | size | variant | time (s) | process (s) | GB/s | peak RSS (GB) | time / copy | baseline / time |\n"
            "|---|---:|---|---:|---:|---:|---:|---:|---:|\n")
    lines = [f"| {r['format']} | {r['bytes'] / GB:.2f} GB | {r['variant']} | {r['seconds']:.2f} | {r['process_s']:.2f} | "
             f"{r['gb_per_s']:.2f} | {r['peak_rss'] / GB:.2f} | {r['vs_copy']:.2f}x | {r['baseline_over']:.1f}x |"
             for r in rows]
    return head + "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--formats", default="dcp", help="comma-separated source formats, or 'all' (default dcp)")
    p.add_argument("--sizes", default="1", help="checkpoint sizes in GB, comma separated (default 1)")
    p.add_argument("--src", help="benchmark this existing checkpoint (of the one format given) instead of generating one")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="N for the rayN variant")
    p.add_argument("--variants", default=",".join(VARIANTS), help="ray1/rayN run for dcp only")
    p.add_argument("--work", default="/tmp/shardfix-bench", help="scratch directory (checkpoints and outputs)")
    p.add_argument("--json", default="bench-out/bench.json", help="where to write the results")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--vocab", type=int, default=None, help="true vocab for dcp (default: the generator's, 50257)")
    p.add_argument("--cold", action="store_true", help="evict the source from the page cache before every run")
    p.add_argument("--keep", action="store_true", help="keep generated checkpoints (reused by later runs)")
    for hidden in ("--child", "--out", "--format", "--size-bytes"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    return p, p.parse_args(argv)


def write_json(args: argparse.Namespace, info: dict[str, Any], formats: list[str], rows: list[dict[str, Any]],
               all_runs: list[dict[str, Any]], failures: list[str]) -> Path:
    """Write (or rewrite) the results file: machine, config, how each format was generated, rows, runs."""
    from benchlib.formats import FORMATS

    info["loadavg_at_end"] = os.getloadavg()
    config = {k: v for k, v in vars(args).items() if k not in ("child", "out", "format", "size_bytes", "generate")}
    doc = {"machine": info, "config": config, "generated_how": {f: FORMATS[f].how for f in formats}, "results": rows,
           "runs": all_runs, "failures": failures, "table_markdown": fmt_table(rows)}
    path = Path(args.json) if Path(args.json).is_absolute() else ROOT / args.json
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p, args = parse_args(argv)
    if args.child:
        run_child(args)
        return 0
    if args.generate:
        run_generate(args)
        return 0
    from benchlib.formats import FORMATS
    from benchlib.measure import machine

    from shardfix.examples.synthetic import VOCAB

    args.vocab = args.vocab or VOCAB
    formats = list(FORMATS) if args.formats == "all" else [f for f in args.formats.split(",") if f]
    variants = [v for v in args.variants.split(",") if v]
    if set(formats) - set(FORMATS) or set(variants) - set(VARIANTS):
        p.error(f"choose formats from {', '.join(FORMATS)} and variants from {', '.join(VARIANTS)}")
    if args.src and len(formats) != 1:
        p.error("--src takes one --formats entry: the format of that checkpoint")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    info = machine()
    print(f"machine: {info['cpus']} CPUs ({info['cpu']}), {info['memory_gib']} GiB, torch {info['torch']}, "
          f"ray {info['ray']}; load average {info['loadavg_at_start']}", flush=True)
    rows: list[dict[str, Any]] = []
    all_runs: list[dict[str, Any]] = []
    failures = []
    sizes = [float(s) for s in args.sizes.split(",")] if not args.src else [0.0]
    for fmt in formats:
        fvariants = [v for v in variants if fmt == "dcp" or v not in RAY]
        for size_gb in sizes:
            try:
                r, a = bench_one(fmt, size_gb, fvariants, args)
            except RuntimeError as exc:  # one format failing does not lose the others' figures
                print(f"FAILED {fmt} {size_gb:g} GB: {exc}", flush=True)
                failures.append(f"{fmt} {size_gb:g} GB: {str(exc)[:2000]}")
                continue
            rows += r
            all_runs += a
            if r and r[0]["output_check"] and not r[0]["output_check"]["ok"]:
                failures.append(f"{fmt} {size_gb:g} GB: output {r[0]['output_check']['verdict']}")
            path = write_json(args, info, formats, rows, all_runs, failures)  # after each: a long run keeps what it measured
    print("\n" + fmt_table(rows))
    path = write_json(args, info, formats, rows, all_runs, failures)
    print(f"\nwrote {path}; load average at the end {info['loadavg_at_end']}")
    for f in failures:
        print(f"FAILURE: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
