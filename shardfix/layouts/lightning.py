"""PyTorch Lightning ``FSDPStrategy(state_dict_type="sharded")`` checkpoints.

A DCP directory of ``{"model": ..., "optimizer_0": ..., "optimizer_1": ...}`` (optimizer state
keyed by FQN: ``optimizer_0.state.<fqn>.exp_avg``) plus ``meta.pt``: a torch.save of the rest
of Lightning's checkpoint (epoch, global_step, loops, callbacks, hyperparameters).
``optimizer_<i>`` is read as optimizer ``i``; ``epoch`` and ``global_step`` from ``meta.pt``
(loaded with ``weights_only=True``) are reported. Lightning's single-file ``.ckpt`` is a plain
torch.save file (``state_dict`` + ``optimizer_states``) and needs no layout.
"""

from __future__ import annotations

import re
from pathlib import Path

from shardfix.layouts._common import not_converted, torch_facts
from shardfix.sources import dcp
from shardfix.sources.base import PathPart
from shardfix.sources.composite import CompositeSource, Facts, Part

NAME = "lightning-fsdp"
DESCRIBE = "a Lightning FSDPStrategy(state_dict_type='sharded') directory (DCP files + meta.pt)"
META = "meta.pt"
FACTS = ("epoch", "global_step")
_OPTIMIZER = re.compile(r"^optimizer_(\d+)$")


def detect(path: Path) -> bool:
    """A DCP directory with Lightning's ``meta.pt`` beside it."""
    return path.is_dir() and (path / META).is_file() and dcp.detect(path)


def _paths(path: tuple[PathPart, ...]) -> tuple[PathPart, ...]:
    """``("optimizer_0", "state", fqn, s)`` -> ``("optimizers", 0, "state", fqn, s)``; the rest as saved."""
    if path and isinstance(path[0], str) and (m := _OPTIMIZER.match(path[0])):
        return ("optimizers", int(m.group(1)), *path[1:])
    return path


def open(path: Path, trust_pickle: bool = False) -> CompositeSource:  # noqa: A001 - registry verb
    src = dcp.open(path, trust_pickle=trust_pickle)
    values, note = torch_facts(path / META, FACTS)
    claimed = {p.name for p in src.index.files} - {META}
    return CompositeSource(path, NAME, [Part("", src, _paths)], facts=[Facts(META, values)],
                           not_converted=not_converted(path, claimed), notes=[note] if note else [])
