"""Key rules: where a checkpoint keeps its model and optimizer, and wrapper prefixes to strip.

Rules are data (tuples of container names and wrapper components) applied by small pure
functions, each returning the actions it took so the ledger can record them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from shardfix.sources.base import PathPart

#: Top-level keys under which checkpoints keep the model's state dict.
MODEL_CONTAINERS = ("model", "state_dict", "model_state_dict", "module")
#: Top-level keys under which checkpoints keep optimizer state (a dict, or a list of them).
OPTIM_CONTAINERS = ("optim", "optimizer", "optimizer_state_dict", "optimizers", "optimizer_states")
#: Module-path components that wrappers insert (torch.compile, DDP/DeepSpeed, FSDP1, AC).
WRAPPERS = ("_orig_mod", "module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def strip_wrappers(name: str) -> tuple[str, list[str]]:
    """Remove wrapper components wherever they occur in a dotted module path.

    Returns:
        The cleaned name and the list of components removed (in order).
    """
    parts = name.split(".")
    kept = [p for p in parts if p not in WRAPPERS]
    removed = [p for p in parts if p in WRAPPERS]
    if not kept:  # a parameter literally named like a wrapper: leave it alone
        return name, []
    return ".".join(kept), removed


#: model tensor, per-parameter optimizer state, a param-group value, or anything else (training metadata)
RoleKind = Literal["model", "optim_state", "param_group", "meta"]


@dataclass(frozen=True, slots=True)
class Role:
    """What a source entry is, decided from its path alone."""

    kind: RoleKind
    name: str = ""  # model: parameter name as saved (wrappers not yet stripped)
    param: Any = None  # optim_state: parameter reference (int id or FQN string)
    state: str = ""  # optim_state: state name (exp_avg, step, ...)
    optimizer: int = 0  # which optimizer of an ``optimizers`` list
    group: int | None = None  # param_group: group index
    hparam: str = ""  # param_group: hyperparameter name
    container: tuple[PathPart, ...] = field(default_factory=tuple)


def _join(parts: tuple[PathPart, ...]) -> str:
    return ".".join(str(p) for p in parts)


def classify(path: tuple[PathPart, ...], flat_model: bool) -> Role:
    """Classify one entry by its nested path.

    Args:
        path: the entry's path through the saved containers.
        flat_model: the whole source is one flat state dict (no containers at the top).
    """
    if not path:
        return Role("meta")
    head = path[0]
    if head in OPTIM_CONTAINERS and len(path) >= 2:
        rest = path[1:]
        opt = 0
        container: tuple[PathPart, ...] = (head,)
        if isinstance(rest[0], int) or (isinstance(rest[0], str) and rest[0].isdigit() and head == "optimizers"):
            opt = int(rest[0])
            container = (head, rest[0])
            rest = rest[1:]
        if len(rest) >= 3 and rest[0] == "state":
            return Role("optim_state", param=rest[1], state=_join(rest[2:]), optimizer=opt, container=container)
        if len(rest) >= 3 and rest[0] == "param_groups":
            try:
                group = int(rest[1])
            except (TypeError, ValueError):
                return Role("meta")
            return Role("param_group", group=group, hparam=_join(rest[2:]), optimizer=opt, container=container)
        return Role("meta", container=container)
    if head in MODEL_CONTAINERS and len(path) >= 2:
        return Role("model", name=_join(path[1:]), container=(head,))
    if flat_model:
        return Role("model", name=_join(path))
    return Role("meta")


def is_flat_model(paths: list[tuple[PathPart, ...]], tensor_paths: list[tuple[PathPart, ...]]) -> bool:
    """True when the source is a bare state dict: no known container holds its tensors."""
    known = set(MODEL_CONTAINERS) | set(OPTIM_CONTAINERS)
    return not any(p and p[0] in known and len(p) >= 2 for p in tensor_paths)


#: The top-level keys of a bare ``optimizer.state_dict()``.
OPTIMIZER_KEYS = ("state", "param_groups")


def is_bare_optimizer(paths: list[tuple[PathPart, ...]]) -> bool:
    """True when the source is a bare ``optimizer.state_dict()`` (only ``state`` and ``param_groups``)."""
    heads = {p[0] for p in paths if p}
    return bool(heads) and heads <= set(OPTIMIZER_KEYS) and "state" in heads
