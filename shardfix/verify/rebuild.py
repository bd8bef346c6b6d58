"""``verify --against``: what each output tensor must be, rebuilt from the source -- never from the report.

The report is a claim to check. Its ops and source keys could have been edited to make a zeroed,
constant or swapped tensor "recompute" correctly, so :func:`rebuild_expected` plans the conversion
again from SRC under the options the report records (``--trust-pickle`` comes from verify's own
flag; ``--target-model`` names code, which a report may not make verify import) and returns each
planned output tensor by name. The recompute then uses those sources and ops only.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from shardfix.errors import ShardfixError
from shardfix.options import ConvertOptions
from shardfix.outputs.writer import tensor_bytes
from shardfix.plan import OutputTensor, build_plan
from shardfix.plan.hf_dir import hf_directory
from shardfix.sources.base import Source
from shardfix.targets.files import merge_targets

#: Options that change only how files are written, not what they hold.
_RUN_ONLY = ("resume", "overwrite", "keep_foreign", "strict", "progress", "verify", "executor", "workers", "device",
             "ray_address")


def _options(recorded: dict[str, Any], trust_pickle: bool) -> ConvertOptions:
    names = set(ConvertOptions.field_names()) - set(_RUN_ONLY)
    kw = {k: v for k, v in recorded.items() if k in names}
    kw["trust_pickle"] = trust_pickle
    return ConvertOptions(**kw)


def rebuild_expected(src: Source, report: dict[str, Any], trust_pickle: bool,
                     open_companions: Any) -> tuple[dict[str, OutputTensor], str | None]:
    """(planned output tensor by name, None) or ({}, why the plan cannot be rebuilt).

    Args:
        src: the opened ``--against`` source.
        report: the report in OUT (only its ``options`` are used).
        trust_pickle: verify's own ``--trust-pickle``.
        open_companions: callable opening a ``--companions`` path (returns a :class:`Source`).
    """
    recorded = report.get("options")
    if not isinstance(recorded, dict):
        return {}, "the report records no options to rebuild the plan with"
    if recorded.get("target_model"):
        return {}, (f"the report names --target-model {recorded['target_model']!r}; verify never imports code a "
                    "report names -- convert again to check this output")
    try:
        opts = _options(recorded, trust_pickle)
        companions = None
        if opts.companions:
            comp = open_companions(Path(opts.companions))
            companions = comp.index
            comp.close()
        plan = build_plan(src.index, opts, merge_targets(opts), companions)
        hf_directory(plan, src, opts)  # the same post-plan stage convert runs: tied drop, PEFT adapter split
    except (ShardfixError, TypeError, ValueError) as e:
        return {}, f"cannot rebuild the plan from the source under the recorded options ({e})"
    return {t.name: t for f in plan.files for t in f.tensors}, None


class Recompute:
    """Recompute each output tensor from the source with its recorded ops and compare bytes."""

    def __init__(self, against: str | Path, trust_pickle: bool, report: dict[str, Any], problems: list[str]) -> None:
        from shardfix.layouts import open_checkpoint

        self.src = open_checkpoint(against, trust_pickle=trust_pickle)
        self.trust_pickle = trust_pickle
        self.problems = problems
        self.compared = 0
        self._key: tuple[str, str] | None = None
        self._value: Any = None
        keys = Counter(e.get("source") for e in report.get("ledger") or [])
        for e in self.src.index.entries:
            n = keys.pop(e.key, 0)
            if n != 1:
                problems.append(f"ledger: source entry {e.key} appears {n} times (must be exactly once)")
        for key in keys:
            problems.append(f"ledger: names {key}, which {against} does not hold (is this the right source?)")
        self.expected, why = rebuild_expected(self.src, report, trust_pickle, self._open_companions)
        if why:
            problems.append(f"--against {against}: {why}")
        self.rebuilt = why is None
        self.seen: set[str] = set()
        self._comp: Any = None

    def _open_companions(self, path: Path) -> Any:
        from shardfix.layouts import open_checkpoint

        if self._comp is None:
            self._comp = open_checkpoint(path, trust_pickle=self.trust_pickle)
        return self._comp

    def _base(self, exp: OutputTensor) -> Any:
        if exp.ops and exp.ops[0]["op"] == "value":
            return None
        key = (exp.origin, exp.source)
        if key != self._key:
            self._value = None
            src = self._comp if exp.origin == "companions" and self._comp is not None else self.src
            self._value = src.read_tensor(exp.source)
            self._key = key
        return self._value

    def compare(self, path: Path, t: dict[str, Any], data: bytearray) -> None:
        import numpy as np

        from shardfix.dtypes import torch_dtype
        from shardfix.reconcile.ops import apply_ops

        name = t["name"]
        exp = self.expected.get(name)
        if exp is None or name in self.seen:
            if self.rebuilt:
                self.problems.append(f"{path}: tensor {name}: " + ("written twice" if exp else
                                     "not in the plan rebuilt from the source under the recorded options"))
            return
        self.seen.add(name)
        if exp.source != t.get("source") or exp.ops != (t.get("ops") or []):
            self.problems.append(f"{path}: tensor {name}: the report says it comes from {t.get('source')} with "
                                 f"{len(t.get('ops') or [])} op(s); the plan rebuilt from the source says {exp.source} "
                                 f"with {len(exp.ops)} (the report was edited, or the source is another one)")
        try:
            expect = apply_ops(self._base(exp), exp.ops).contiguous()
        except Exception as e:  # a damaged source or a malformed op: report it, keep checking
            self.problems.append(f"{path}: tensor {name}: cannot recompute it from {exp.source} "
                                 f"({type(e).__name__}: {e})")
            return
        self.compared += 1
        if expect.dtype != torch_dtype(t["dtype"]) or list(expect.shape) != t["shape"]:
            self.problems.append(f"{path}: tensor {name}: recomputing it from {exp.source} gives "
                                 f"{expect.dtype} {list(expect.shape)}, the file holds {t['dtype']} {t['shape']}")
            return
        want = tensor_bytes(expect)
        if want != memoryview(data):
            a = np.frombuffer(want, dtype=np.uint8)
            b = np.frombuffer(data, dtype=np.uint8)
            diff = np.flatnonzero(a != b) if len(a) == len(b) else np.arange(min(len(a), len(b)))
            first = int(diff[0]) // max(expect.element_size(), 1) if len(diff) else 0
            self.problems.append(f"{path}: tensor {name}: differs from {exp.source} in the source after the "
                                 f"planned ops ({len(diff)} bytes differ; first at element {first})")

    def close(self) -> None:
        missing = sorted(set(self.expected) - self.seen)
        if missing:
            self.problems.append(f"{len(missing)} tensor(s) of the plan rebuilt from the source are in no output "
                                 f"file: {', '.join(missing[:10])}")
        self._value = None
        self.src.close()
        if self._comp is not None:
            self._comp.close()
