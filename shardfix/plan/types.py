"""The plan's data: output tensors and files, ledger entries, and the plan itself.

Every type here serialises to JSON (``asdict``) so a plan can be printed, stored in the report
and sent to Ray tasks; ``Plan.summary()`` is the short human form.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from shardfix.dtypes import itemsize, numel
from shardfix.io.units import format_bytes
from shardfix.outputs.layout import ADAPTER, COMPANIONS, MODEL, OPTIMIZER, PARTIAL_ROWS_KEY, Sidecar  # noqa: F401
from shardfix.reconcile.fused import Part
from shardfix.reconcile.padding import ShapeFix
from shardfix.sources.base import TensorEntry


class _Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


T = TypeVar("T", bound=_Sized)

SET_PREFIX = {MODEL: MODEL, OPTIMIZER: OPTIMIZER, COMPANIONS: COMPANIONS}


@dataclass(slots=True)
class OutputTensor:
    """One tensor to write: read ``source`` (or make it from ``ops[0]``), apply ``ops``."""

    name: str
    source: str
    dtype: str
    shape: list[int]
    ops: list[dict[str, Any]] = field(default_factory=list)
    #: which input the source key belongs to: "source" (the checkpoint) or "companions"
    origin: str = "source"

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * itemsize(self.dtype)


@dataclass(slots=True)
class OutputFile:
    name: str
    set: str
    tensors: list[OutputTensor] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    #: the identity of the source bytes the tensors are read from (``shardfix.plan.identity``)
    source_identity: str = ""

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def fingerprint(self) -> str:
        """A hash of everything that determines this file's bytes, the source's identity included (``--resume``)."""
        doc = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(doc.encode()).hexdigest()[:32]


def fate_of(outputs: int, reshaped: bool) -> Fate:
    """``split`` for several outputs, ``reconciled`` when the shape changed, else ``written``."""
    return "split" if outputs > 1 else "reconciled" if reshaped else "written"


#: What became of a source entry: copied (maybe renamed or cast), reshaped, cut into several
#: outputs, recorded in a sidecar (param-group values), or not written (``reason`` says why).
Fate = Literal["written", "reconciled", "split", "recorded", "dropped"]
EntryKind = Literal["tensor", "object"]


@dataclass(slots=True)
class LedgerEntry:
    source: str
    fate: Fate
    outputs: list[str] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None
    kind: EntryKind = "tensor"
    dtype: str | None = None
    shape: list[int] | None = None
    #: set for entries of a second input (``--companions``); None for the checkpoint itself
    origin: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for optional in ("reason", "origin"):
            if d[optional] is None:
                d.pop(optional)
        return d


@dataclass(slots=True)
class Plan:
    source: dict[str, Any]
    options: dict[str, Any]
    files: list[OutputFile]
    ledger: list[LedgerEntry]
    findings: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    param_groups: list[dict[str, Any]] | None = None
    #: files beside the weights (config.json, tokenizer files, adapter config), staged and placed by the layout
    sidecars: list[Sidecar] = field(default_factory=list)

    def files_of(self, kind: str) -> list[OutputFile]:
        return [f for f in self.files if f.set == kind]

    @property
    def total_bytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "options": self.options,
            "findings": self.findings,
            "files": [asdict(f) for f in self.files],
            "param_groups": self.param_groups,
            "sidecars": [{"name": s.name, "what": s.what, **s.extra} for s in self.sidecars],
            "ledger": [e.to_dict() for e in self.ledger],
            "warnings": self.warnings,
        }

    def summary(self) -> str:
        fates: dict[str, int] = defaultdict(int)
        for e in self.ledger:
            fates[e.fate] += 1
        lines = [
            f"source: {self.source['path']} ({self.source['format']}, {len(self.source['files'])} files, "
            f"{format_bytes(self.source['bytes'])})",
            "ledger: " + ", ".join(f"{n} {k}" for k, n in sorted(fates.items())) + f" ({len(self.ledger)} entries)",
        ]
        for kind in (MODEL, OPTIMIZER, COMPANIONS, ADAPTER):
            fs = self.files_of(kind)
            if fs:
                n = sum(len(f.tensors) for f in fs)
                lines.append(f"{kind}: {n} tensors in {len(fs)} file(s), {format_bytes(sum(f.nbytes for f in fs))}")
        if self.sidecars:
            lines.append("beside them: " + ", ".join(s.name for s in self.sidecars))
        changed = [e for e in self.ledger if e.fate in ("reconciled", "split")]
        for e in changed[:20]:
            acts = "; ".join(_action_text(a) for a in e.actions if a["action"] != "rename")
            lines.append(f"  {e.fate}: {e.source} -> {', '.join(e.outputs)}: {acts}")
        if len(changed) > 20:
            lines.append(f"  ... and {len(changed) - 20} more")
        dropped = [e for e in self.ledger if e.fate == "dropped" and e.kind == "tensor"]
        for e in dropped[:10]:
            lines.append(f"  dropped: {e.source}: {e.reason}")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        return "\n".join(lines)


def _action_text(a: dict[str, Any]) -> str:
    if a["action"] in ("trim", "grow"):
        return f"{a['action']} ({a['rule']}) {a['from']} -> {a['to']}"
    if a["action"] == "cast":
        return f"cast {a['from']} -> {a['to']}"
    return a["action"] + (f" ({a['rule']})" if "rule" in a else "")


@dataclass(slots=True)
class ModelTensor:
    entry: TensorEntry
    name: str
    actions: list[dict[str, Any]]
    fix: ShapeFix = field(default_factory=ShapeFix)
    dropped: str | None = None
    #: outputs made from this tensor after the shape fix: one, or several for a fused split.
    parts: list[Part] = field(default_factory=list)

    def outputs(self) -> list[tuple[str, list[dict[str, Any]], list[dict[str, Any]]]]:
        """(output name, ops, actions) for each output, the shape fix first, in source order."""
        parts = self.parts or [Part(self.name)]
        return [(p.name, [*self.fix.ops, *p.ops], [*self.fix.actions, *p.actions]) for p in parts]




def pack_in_order(items: list[T], budget: int) -> list[list[T]]:
    """Group ``items`` (anything with ``nbytes``), keeping their order, into runs of at most
    ``budget`` bytes; an item larger than the budget is a group of its own."""
    groups: list[list[T]] = [[]]
    size = 0
    for item in items:
        if groups[-1] and size + item.nbytes > budget:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item.nbytes
    return groups if groups[0] else []
