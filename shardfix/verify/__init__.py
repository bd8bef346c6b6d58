"""``shardfix verify``: re-read every output tensor and check it against the report and index.

Each output file is read once, front to back (memory: one tensor): its xxh3-128 must match the
report, its header must list exactly the report's tensors with the report's dtypes and shapes at
consistent offsets, and each tensor's bytes must match the xxh3-64 the writer recorded -- so a
flipped byte is named by file and tensor. The ``*.safetensors.index.json`` files must map every
tensor to its file, the report's ledger must account for every output, and nothing else (a stray
shard, a leftover staging area) may sit where a loader would pick it up.

With ``--against SRC`` the plan is rebuilt from SRC under the options the report records
(:mod:`shardfix.verify.rebuild`) -- never from the report's own ops or source keys, which could have
been edited -- and each tensor is recomputed through the rebuilt plan's ops and compared bit for bit;
every planned tensor must be in OUT and every source entry in the ledger exactly once. Every problem is listed; none stops the
check.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import xxhash

from shardfix.dtypes import itemsize, numel
from shardfix.errors import BadInputError, ShardfixError
from shardfix.io.preads import fill_upto, pread_upto
from shardfix.io.st_header import Header, build_header, read_header
from shardfix.outputs.hf import PARAM_GROUPS_NAME
from shardfix.outputs.layout import REPORT_NAME, STAGING
from shardfix.outputs.sidecars import safe_relative
from shardfix.outputs.writer import TensorSpec
from shardfix.verify.rebuild import Recompute
from shardfix.verify.sidecars import check_sidecars

_SETS = ("model", "optimizer", "companions")
_BLOCK = 16 << 20


def verify_output(
    out: str | Path, against: str | Path | None = None, *, trust_pickle: bool = False
) -> tuple[list[str], dict[str, Any]]:
    """Check the output directory ``out``; return (problems, stats).

    Args:
        out: a directory ``shardfix convert`` wrote.
        against: the source checkpoint; when given, every tensor is recomputed from it.
        trust_pickle: allow full unpickling of ``against`` (never taken from the report).

    Raises:
        BadInputError: ``out`` has no readable report, so there is nothing to check against.
    """
    out = Path(out)
    report = _load_report(out)
    problems: list[str] = []
    stats: dict[str, Any] = {"files": 0, "tensors": 0, "bytes": 0}
    files = _report_files(report, out / REPORT_NAME, problems)
    if report.get("status") != "complete":
        err = f" ({report['error']})" if report.get("error") else ""
        problems.append(f"{out / REPORT_NAME}: status is {report.get('status')!r}, not 'complete'{err}")
    _check_directory(out, files, report, problems)
    check_sidecars(out, report, {f["name"] for f in files}, problems)
    _check_ledger(report, files, problems)
    recompute = None
    if against is not None:
        recompute = Recompute(against, trust_pickle, report, problems)
    for f in files:
        _check_file(out, f, problems, stats, recompute)
    if recompute is not None:
        recompute.close()
        stats["compared"] = recompute.compared
    return problems, stats


# -- report ---------------------------------------------------------------------------------------


def _load_report(out: Path) -> dict[str, Any]:
    report_path = out / REPORT_NAME
    if not out.is_dir():
        raise BadInputError(f"{out}: not a directory; pass the output directory of shardfix convert")
    if not report_path.is_file():
        raise BadInputError(f"{out}: no {REPORT_NAME}; not a finished shardfix output (rerun convert, or "
                            "convert --resume if it was interrupted)")
    try:
        report = json.loads(report_path.read_text())
    except (ValueError, OSError) as e:
        raise BadInputError(f"{report_path}: not readable JSON ({e}); the report is damaged") from e
    if not isinstance(report, dict) or not isinstance(report.get("outputs"), dict):
        raise BadInputError(f"{report_path}: has no 'outputs' section; not a shardfix report")
    return report


def _report_files(report: dict[str, Any], path: Path, problems: list[str]) -> list[dict[str, Any]]:
    """The report's output files, keeping only well-formed entries (the rest become problems)."""
    raw = report["outputs"].get("files")
    if not isinstance(raw, list):
        problems.append(f"{path}: outputs.files is not a list")
        return []
    good = []
    for i, f in enumerate(raw):
        if _well_formed(f):
            good.append(f)
        else:
            problems.append(f"{path}: outputs.files[{i}] is malformed")
    return good


def _well_formed(f: Any) -> bool:
    if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(f.get("checksum"), str):
        return False
    if not safe_relative(f["name"]) or not isinstance(f.get("tensors"), list):
        return False
    for t in f["tensors"]:
        if not isinstance(t, dict) or not all(isinstance(t.get(k), str) for k in ("name", "dtype", "checksum")):
            return False
        if not isinstance(t.get("shape"), list) or not all(type(d) is int and d >= 0 for d in t["shape"]):
            return False
        try:
            itemsize(t["dtype"])
        except ShardfixError:
            return False
    return True


def _nbytes(t: dict[str, Any]) -> int:
    return numel(t["shape"]) * itemsize(t["dtype"])


def _check_ledger(report: dict[str, Any], files: list[dict[str, Any]], problems: list[str]) -> None:
    """Every output tensor comes from exactly one ledger entry naming it, from the same source."""
    produced: dict[str, str] = {}
    for e in report.get("ledger") or []:
        for name in e.get("outputs") or []:
            if name.endswith(".json"):
                continue
            if name in produced:
                problems.append(f"ledger: {name} is an output of both {produced[name]} and {e.get('source')}")
            produced[name] = e.get("source")
    for f in files:
        for t in f["tensors"]:
            src = produced.pop(t["name"], None)
            if src is None:
                problems.append(f"{f['name']}: tensor {t['name']} has no ledger entry producing it")
            elif t.get("source") is not None and t["source"] != src:
                problems.append(f"{f['name']}: tensor {t['name']} comes from {t['source']}, the ledger says {src}")
    for name, src in produced.items():
        problems.append(f"ledger: {src} lists output {name}, which no output file holds")


def _check_directory(out: Path, files: list[dict[str, Any]], report: dict[str, Any], problems: list[str]) -> None:
    listed = {f["name"] for f in files}
    for p in sorted(out.glob("*.safetensors")):
        if p.name not in listed:
            problems.append(f"{p}: not in the report (a stray file a loader globbing *.safetensors would pick up)")
    if (out / STAGING).exists():
        problems.append(f"{out / STAGING}: an interrupted run's staging area is still here")
    for kind in _SETS:
        of_set = [f for f in files if f.get("set") == kind]
        idx = out / f"{kind}.safetensors.index.json"
        if len(of_set) > 1 and not idx.is_file():
            problems.append(f"{idx}: missing; {len(of_set)} {kind} files need an index")
        if idx.is_file():
            _check_index(idx, of_set, problems)
    groups = report["outputs"].get("param_groups")
    if groups is not None and any(f.get("set") == "optimizer" for f in files):
        path = out / PARAM_GROUPS_NAME
        try:
            data = json.loads(path.read_text())
            if data != {"param_groups": groups}:
                problems.append(f"{path}: differs from the param groups in the report")
        except (OSError, ValueError) as e:
            problems.append(f"{path}: missing or unreadable ({e})")


def _check_index(idx: Path, files: list[dict[str, Any]], problems: list[str]) -> None:
    try:
        data = json.loads(idx.read_text())
        weight_map = data["weight_map"]
        total = data["metadata"]["total_size"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        problems.append(f"{idx}: unreadable or not a Hugging Face index ({type(e).__name__}: {e})")
        return
    expected = {t["name"]: f["name"] for f in files for t in f["tensors"]}
    for name, fname in sorted(weight_map.items()):
        if name not in expected:
            problems.append(f"{idx.name}: maps {name} to {fname}, but the report lists no such tensor")
        elif expected[name] != fname:
            problems.append(f"{idx.name}: maps {name} to {fname}, but it is in {expected[name]}")
    for name, fname in sorted(expected.items()):
        if name not in weight_map:
            problems.append(f"{idx.name}: does not map {name} (in {fname})")
    size = sum(_nbytes(t) for f in files for t in f["tensors"])
    if total != size:
        problems.append(f"{idx.name}: total_size {total} != {size}, the bytes of the tensors it maps")


# -- files ----------------------------------------------------------------------------------------


def _layout(f: dict[str, Any]) -> tuple[int, dict[str, tuple[int, int]]]:
    """Where shardfix's writer puts each tensor of ``f`` (used when the file's header is unreadable)."""
    specs = [TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in f["tensors"]]
    start = len(build_header(specs, {"format": "pt"}))
    where, off = {}, 0
    for s in specs:
        where[s.name] = (off, off + s.nbytes)
        off += s.nbytes
    return start, where


def _header_problems(path: Path, f: dict[str, Any], header: Header, problems: list[str]) -> dict[str, tuple[int, int]]:
    """Compare the (validated) header with the report; return each listed tensor's data range."""
    listed = {t["name"]: t for t in f["tensors"]}
    where: dict[str, tuple[int, int]] = {}
    for name, info in header.tensors.items():
        t = listed.get(name)
        if t is None:
            problems.append(f"{path}: holds tensor {name}, which the report does not list")
        elif info.dtype != t["dtype"] or list(info.shape) != t["shape"]:
            problems.append(f"{path}: tensor {name} is {info.dtype} {list(info.shape)} in the header, the report "
                            f"says {t['dtype']} {t['shape']}")
        else:
            where[name] = (info.start, info.end)
    for name in listed:
        if name not in header.tensors:
            problems.append(f"{path}: tensor {name} is missing from the file")
    return where


def _check_file(out: Path, f: dict[str, Any], problems: list[str], stats: dict[str, Any], recompute: Any) -> None:
    path = out / f["name"]
    if not path.is_file():
        problems.append(f"{path}: missing")
        return
    stats["files"] += 1
    size = path.stat().st_size
    if f.get("bytes") is not None and size != f["bytes"]:
        problems.append(f"{path}: {size} bytes, the report says {f['bytes']}")
    try:
        header = read_header(path)
        data_start, where = header.data_start, _header_problems(path, f, header, problems)
    except BadInputError as e:
        why = str(e).removeprefix(f"{path}: ")
        problems.append(f"{path}: header unreadable ({why}); checking its tensors at the offsets shardfix writes")
        data_start, where = _layout(f)
    file_hash = xxhash.xxh3_128()
    planned = {t["name"]: t for t in f["tensors"]}
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        for name, (start, end) in sorted(where.items(), key=lambda kv: kv[1]):
            pos = _hash_to(fd, pos, data_start + start, file_hash)
            if pos != data_start + start:
                problems.append(f"{path}: tensor {name}: the file ends before its data")
                continue
            data = _read(fd, pos, end - start)
            pos += len(data)
            file_hash.update(data)
            t = planned[name]
            stats["tensors"] += 1
            stats["bytes"] += len(data)
            if len(data) != end - start:
                problems.append(f"{path}: tensor {name}: the file ends inside its data")
                continue
            digest = xxhash.xxh3_64_hexdigest(data)
            if digest != t["checksum"]:
                problems.append(f"{path}: tensor {name}: checksum {digest} != {t['checksum']} in the report "
                                "(its bytes changed after they were written)")
            if recompute is not None:
                recompute.compare(path, t, data)
        pos = _hash_to(fd, pos, None, file_hash)
    finally:
        os.close(fd)
    if file_hash.hexdigest() != f["checksum"]:
        problems.append(f"{path}: file checksum {file_hash.hexdigest()} != {f['checksum']} in the report "
                        "(the file changed after it was written)")
    if where and len(where) == len(planned):
        _loader_check(path, problems)


def _read(fd: int, pos: int, n: int) -> bytearray:
    """Up to ``n`` bytes at ``pos`` (fewer when the file ends first)."""
    buf = bytearray(n)
    got = fill_upto(fd, pos, memoryview(buf))
    return buf if got == n else buf[:got]


def _hash_to(fd: int, pos: int, stop: int | None, h: Any) -> int:
    """Hash bytes from ``pos`` up to ``stop`` (or the end); return the new position."""
    while stop is None or pos < stop:
        n = _BLOCK if stop is None else min(_BLOCK, stop - pos)
        chunk = pread_upto(fd, pos, n)
        if not chunk:
            break
        h.update(chunk)
        pos += len(chunk)
    return pos


def _loader_check(path: Path, problems: list[str]) -> None:
    """The safetensors library itself must accept the file (what a loader does first)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as h:
            h.keys()
    except Exception as e:  # SafetensorError and friends
        problems.append(f"{path}: the safetensors library refuses it ({type(e).__name__}: {e})")
