"""The planner's working state: what every stage reads and adds to.

:class:`PlanContext` owns the ledger, the warnings and the problems, so stages are functions of one
argument instead of passing mutable out-parameters around. Problems are collected and raised
together at the end of planning (one error listing everything), warnings go into the plan.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from shardfix.options import ConvertOptions
from shardfix.plan.types import LedgerEntry, ModelTensor
from shardfix.reconcile.fused import Splitter
from shardfix.reconcile.keys import Role, classify, is_bare_optimizer, is_flat_model
from shardfix.sources.base import SourceIndex
from shardfix.targets import Targets


@dataclass(slots=True)
class PlanContext:
    """The source, the options and targets, and what planning has decided so far."""

    index: SourceIndex
    opts: ConvertOptions
    targets: Targets
    roles: dict[str, Role]
    flat: bool
    ledger: dict[str, LedgerEntry] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: model tensors by name after prefix stripping, in source order
    model: dict[str, ModelTensor] = field(default_factory=dict)
    #: wrapper prefixes stripped, with how often
    prefixes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    #: the profile's split rules; ``part_targets`` are the targets as given (named after split outputs)
    splitter: Splitter | None = None
    part_targets: Targets | None = None
    padded_vocab: int | None = None

    @classmethod
    def start(cls, index: SourceIndex, opts: ConvertOptions, targets: Targets) -> PlanContext:
        paths = [e.path for e in index.entries]
        if is_bare_optimizer(paths):  # torch.save(optimizer.state_dict()): optimizer state, never model tensors
            return cls(index, opts, targets, {e.key: classify(("optim", *e.path), False) for e in index.entries}, False)
        flat = is_flat_model(paths, [e.path for e in index.tensors()])
        roles = {e.key: classify(e.path, flat) for e in index.entries}
        return cls(index, opts, targets, roles, flat)

    def record(self, entry: LedgerEntry) -> None:
        self.ledger[entry.source] = entry
