"""Findings about a checkpoint, from its index alone: format, files, tensors, prefixes, vocab."""

from __future__ import annotations

from collections import Counter
from typing import Any

from shardfix.inspect.findings import format_profile_findings, profile_findings
from shardfix.reconcile.keys import WRAPPERS, classify, is_flat_model
from shardfix.reconcile.padding import looks_padded_vocab
from shardfix.sources.base import SourceIndex, TensorEntry


def inspect_index(index: SourceIndex, profile: str | None = None, target_config: str | None = None) -> dict[str, Any]:
    """Describe a source index as a JSON-serialisable dict.

    Args:
        index: the checkpoint's metadata index.
        profile: ``--profile``: use this profile instead of the detected one.
        target_config: ``--target-config``: heads and head_dim from this config, and the
            architecture check of every attention tensor against it
            (``info["architecture"]["problems"]``).
    """
    tensors = list(index.tensors())
    flat = is_flat_model([e.path for e in index.entries], [e.path for e in tensors])
    roles = {e.key: classify(e.path, flat) for e in index.entries}
    prefixes: Counter[str] = Counter()
    for e in tensors:
        for part in (roles[e.key].name or "").split("."):
            if part in WRAPPERS:
                prefixes[part + "."] += 1
    kinds = Counter(roles[e.key].kind for e in index.entries)
    dtypes = Counter(e.dtype for e in tensors)
    vocab_candidates = sorted(
        {e.shape[0] for e in tensors if roles[e.key].kind == "model" and len(e.shape) == 2
         and looks_padded_vocab(e.shape[0]) and any(k in e.key for k in ("embed", "wte", "lm_head"))}
    )
    return {
        "format": index.format,
        "path": str(index.path),
        "files": [str(p) for p in index.files],
        "total_bytes": index.total_bytes,
        "notes": index.notes,
        "layout": "flat state dict" if flat else "containers",
        "counts": {"tensors": len(tensors), "objects": len(index.entries) - len(tensors), **dict(kinds)},
        "dtypes": dict(dtypes),
        "tensor_bytes": sum(e.nbytes for e in tensors),
        "prefixes": dict(prefixes),
        "padded_vocab_candidates": vocab_candidates,
        "tensors": [_tensor_row(e) for e in tensors],
        "objects": [{"key": e.key, "type": e.type_name, "value": _short(e.value)} for e in index.objects()],
        **profile_findings(index, profile, target_config),
    }


def _tensor_row(e: TensorEntry) -> dict[str, Any]:
    return {"name": e.key, "dtype": e.dtype, "shape": list(e.shape), "chunks": max(len(e.chunks), 1), "bytes": e.nbytes}


def _short(v: Any) -> Any:
    if isinstance(v, (int, float, bool)) or v is None:
        return v
    text = repr(v)
    return text if len(text) <= 120 else text[:117] + "..."


def format_inspection(info: dict[str, Any], limit: int = 60) -> str:
    """A human table of an inspection."""
    lines = [
        f"format:  {info['format']}  ({info['layout']})",
        f"path:    {info['path']}",
        f"files:   {len(info['files'])}, {info['total_bytes']:,} bytes",
        f"tensors: {info['counts']['tensors']} ({info['tensor_bytes']:,} bytes); non-tensor entries: "
        f"{info['counts']['objects']}",
        "dtypes:  " + ", ".join(f"{k} x{n}" for k, n in sorted(info["dtypes"].items())),
    ]
    if info["prefixes"]:
        lines.append("prefixes: " + ", ".join(f"{k} x{n}" for k, n in info["prefixes"].items()))
    if info["padded_vocab_candidates"] and "architecture" not in info:
        lines.append(f"vocab:   {info['padded_vocab_candidates']} rows (multiple of 64: likely padded)")
    for n in info["notes"]:
        lines.append(f"note:    {n}")
    lines += format_profile_findings(info)
    for key, value in info.get("extra", {}).items():
        lines.append(f"{key}: {value}")
    lines.append("")
    rows = info["tensors"]
    width = min(max((len(r["name"]) for r in rows), default=10), 70)
    lines.append(f"{'name':<{width}}  {'dtype':<8} {'shape':<20} chunks")
    for r in rows[:limit]:
        lines.append(f"{r['name']:<{width}}  {r['dtype']:<8} {str(r['shape']):<20} {r['chunks']}")
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more tensors (use --json for all)")
    if info["objects"]:
        lines.append("")
        lines.append("non-tensor entries:")
        for o in info["objects"][:20]:
            lines.append(f"  {o['key']}: {o['type']} = {o['value']}")
        if len(info["objects"]) > 20:
            lines.append(f"  ... {len(info['objects']) - 20} more")
    return "\n".join(lines)


def add_evidence_lines(info: dict[str, Any], evidence: dict[str, Any]) -> None:
    """Put evidence findings into an inspection: as data, and as lines for the human table."""
    info["evidence"] = evidence
    extra = info.setdefault("extra", {})
    for v in evidence["vocab_rows"]:
        extra[f"vocab rows ({v['tensor']})"] = (
            f"{v['rows']} rows; {v['untrained_rows']} never trained (all-zero {v['moment'].rsplit('.', 1)[-1]}); "
            f"trained rows end at {v['trailing_untrained_from']} -> true vocab likely <= {v['likely_vocab_at_most']}"
        )
    for v in evidence["padding_vectors"]:
        extra[f"padding ({v['tensor']})"] = (
            f"length {v['length']}, {v['trailing_ones']} trailing ones; implied world sizes {v['implied_world_sizes'][:8]}"
        )
