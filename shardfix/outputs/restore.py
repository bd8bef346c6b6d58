"""Restore optimizer state that shardfix wrote into a live torch optimizer, by parameter name.

``shardfix convert`` writes optimizer moments as ``state.<param name>.<state name>`` tensors
(``optimizer.safetensors`` or shards plus an index) and the param groups as
``optimizer_param_groups.json``. :func:`load_optimizer_state` matches those names against
``model.named_parameters()`` (wrapper components such as ``_orig_mod`` and ``module`` stripped
the same way the converter strips them), builds a torch-format state dict keyed by the live
optimizer's own parameter ids and groups, and calls ``optimizer.load_state_dict``. The live
optimizer may cover any subset of the model (only the trainable parameters) and may group its
parameters differently from the optimizer that was saved. A tied parameter (one tensor under
several names, e.g. ``model.embed_tokens.weight`` and ``lm_head.weight``) is restored from
whichever of its names the state was saved under.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from shardfix.errors import BadInputError
from shardfix.outputs.hf import LAYOUT, PARAM_GROUPS_NAME
from shardfix.outputs.layout import OPTIMIZER, PARTIAL_ROWS_KEY, REPORT_NAME
from shardfix.reconcile.keys import strip_wrappers

INDEX_NAME = LAYOUT.index_name(OPTIMIZER)
_PARTIAL_NAME = re.compile(r"\.rows_\d+_\d+$")
#: keys of a saved param group that are bookkeeping, not hyperparameters.
_NOT_HYPER = frozenset({"optimizer", "group", "params", "param_names"})


@dataclass(slots=True)
class LoadResult:
    """What :func:`load_optimizer_state` restored, by parameter name."""

    loaded: list[str] = field(default_factory=list)
    """Parameters of the live optimizer whose saved state was restored."""
    missing: list[str] = field(default_factory=list)
    """Parameters of the live optimizer with no saved state (they start fresh)."""
    unexpected: list[str] = field(default_factory=list)
    """Parameters with saved state that the live optimizer does not hold."""
    mismatched: dict[str, str] = field(default_factory=dict)
    """Parameters whose saved state does not fit the live parameter, and why (not loaded)."""
    partial: list[str] = field(default_factory=list)
    """Partial slices (``--partial-optimizer``) present in the output: never loaded."""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)}", f"missing {len(self.missing)}", f"unexpected {len(self.unexpected)}"]
        if self.mismatched:
            parts.append(f"mismatched {len(self.mismatched)}")
        if self.partial:
            parts.append(f"partial slices skipped {len(self.partial)}")
        lines = ["optimizer state: " + ", ".join(parts)]
        for label, names in (("missing", self.missing), ("unexpected", self.unexpected)):
            if names:
                lines.append(f"  {label}: " + ", ".join(names[:8]) + (" ..." if len(names) > 8 else ""))
        lines += [f"  mismatched: {n}: {why}" for n, why in list(self.mismatched.items())[:8]]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    path: str | Path,
    *,
    hyperparameters: str = "live",
    strict: bool = False,
) -> LoadResult:
    """Restore the optimizer state shardfix wrote under ``path`` into ``optimizer`` by name.

    Args:
        optimizer: a live torch optimizer over some or all of ``model``'s parameters, in any
            number of param groups.
        model: the module whose ``named_parameters()`` name the optimizer's parameters.
        path: a shardfix output directory (or its ``optimizer*.safetensors`` file).
        hyperparameters: ``"live"`` (default) keeps the live optimizer's learning rates, betas
            and other group settings; ``"saved"`` copies them from ``optimizer_param_groups.json``
            into each live group whose parameters all came from saved groups with the same
            settings (groups that mix settings keep their own, with a note).
        strict: raise instead of loading when anything is missing, unexpected or mismatched.

    Returns:
        A :class:`LoadResult` naming what was loaded, missing and unexpected.

    Raises:
        BadInputError: ``path`` holds no optimizer state, a name cannot be parsed, or ``strict``
            and the state does not cover the optimizer exactly.
    """
    if hyperparameters not in ("live", "saved"):
        raise BadInputError(f"hyperparameters={hyperparameters!r}: use 'live' or 'saved'")
    out_dir, files = _optimizer_files(Path(path))
    aliases: dict[int, list[str]] = {}
    for n, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(strip_wrappers(n)[0])
    model_names = {n for names in aliases.values() for n in names}
    result = LoadResult()

    saved = _saved_state(files, model_names, result)

    # a tied parameter has several names; its state may be saved under any of them (DCP: the first)
    by_param = {i: next((n for n in names if n in saved), names[0]) for i, names in aliases.items()}
    live = _live_params(optimizer)
    sd = optimizer.state_dict()
    state: dict[int, dict[str, Any]] = dict(sd["state"])
    todo = _match(live, by_param, aliases, saved, result)

    readers: dict[Path, Any] = {}
    try:
        for i, (name, entries) in todo.items():
            p = live[i]
            values = {}
            for sname, (f, key) in entries.items():
                if f not in readers:
                    readers[f] = safe_open(str(f), framework="pt").__enter__()
                values[sname] = readers[f].get_tensor(key)
            bad = [f"{s} {list(v.shape)}" for s, v in values.items() if v.dim() > 0 and tuple(v.shape) != tuple(p.shape)]
            if bad:
                result.mismatched[name] = f"saved {', '.join(bad)} but the parameter is {list(p.shape)}"
                continue
            state[i] = values
            result.loaded.append(name)
    finally:
        for r in readers.values():
            r.__exit__(None, None, None)

    if strict and not result.ok:
        raise BadInputError(f"{out_dir}: the saved optimizer state does not match the optimizer (strict=True)\n"
                            + result.summary())
    groups = [dict(g) for g in sd["param_groups"]]
    if hyperparameters == "saved":
        _apply_saved_hyperparameters(groups, live, by_param, out_dir, result)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return result


_Saved = dict[str, dict[str, tuple[Path, str]]]


def _match(live: list[torch.Tensor], by_param: dict[int, str], aliases: dict[int, list[str]], saved: _Saved,
           result: LoadResult) -> dict[int, tuple[str, dict[str, tuple[Path, str]]]]:
    """The saved state of each live parameter (by its index in the optimizer); fills ``missing`` and ``unexpected``."""
    live_names: set[str] = set()
    todo: dict[int, tuple[str, dict[str, tuple[Path, str]]]] = {}
    for i, p in enumerate(live):
        name = by_param.get(id(p))
        if name is None:
            result.missing.append(f"<parameter {i} of the optimizer, not a parameter of the model>")
            continue
        live_names.update(aliases[id(p)])  # state saved under another alias of a tied parameter is not unexpected
        if name not in saved:
            result.missing.append(name)
            continue
        todo[i] = (name, saved[name])
    result.unexpected = sorted(n for n in saved if n not in live_names)
    return todo


def _saved_state(files: list[Path], model_names: set[str], result: LoadResult) -> dict[str, dict[str, tuple[Path, str]]]:
    """Where each saved ``state.<param>.<state>`` lives, by parameter and state; partial slices go to ``result``."""
    saved: dict[str, dict[str, tuple[Path, str]]] = {}
    partial: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata() or {}
            try:
                partial |= set(json.loads(meta.get(PARTIAL_ROWS_KEY, "{}")))
            except ValueError:
                result.notes.append(f"{f.name}: unreadable {PARTIAL_ROWS_KEY} metadata; ignored")
            for key in h.keys():
                if key in partial or _PARTIAL_NAME.search(key):
                    result.partial.append(key)
                    continue
                pname, sname = _split_name(key, model_names)
                saved.setdefault(pname, {})[sname] = (f, key)
    return saved


def _optimizer_files(path: Path) -> tuple[Path, list[Path]]:
    """The output directory and its optimizer safetensors files."""
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise BadInputError(f"{path}: no such shardfix output directory")
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise BadInputError(f"{index}: not a safetensors index ({e})") from e
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise BadInputError(f"{index}: weight_map must map tensor names to file names")
        files = [path / f for f in sorted(set(weight_map.values()))]
        root = path.resolve()
        outside = [f for f in files if not f.resolve().is_relative_to(root) or f.resolve() == root]
        if outside:  # an index is data: it never sends us to read files elsewhere
            raise BadInputError(f"{index}: names {outside[0].name!r}, which resolves outside {path}; "
                                "the index must name files inside the output directory")
    else:
        files = sorted(path.glob(f"{OPTIMIZER}*.safetensors"))
    if not files:
        why = _report_warning(path)
        raise BadInputError(
            f"{path}: holds no optimizer*.safetensors; the conversion wrote no optimizer state"
            + (f" ({why})" if why else " (see the warnings in shardfix-report.json)")
        )
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise BadInputError(f"{missing[0]}: listed in {INDEX_NAME} but missing; copy the whole output directory")
    return path, files


def _report_warning(path: Path) -> str | None:
    try:
        report = json.loads((path / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return None
    for w in report.get("warnings", []):
        if "optimizer" in w:
            return w
    return None


def _split_name(key: str, model_names: set[str]) -> tuple[str, str]:
    """``state.<param>.<state>`` -> (param, state); the param is the longest model name that fits."""
    if not key.startswith("state."):
        raise BadInputError(f"optimizer tensor {key!r}: not named state.<param>.<state>; not a shardfix output")
    rest = key[len("state."):]
    best = None
    for i in range(len(rest)):
        if rest[i] == "." and rest[:i] in model_names:
            best = i
    if best is None:  # not a parameter of this model: split at the last dot (state names have none)
        best = rest.rfind(".")
        if best <= 0:
            raise BadInputError(f"optimizer tensor {key!r}: not named state.<param>.<state>")
    return rest[:best], rest[best + 1:]


def _live_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's parameters in the order its ``state_dict()`` numbers them."""
    seen: set[int] = set()
    out = []
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _apply_saved_hyperparameters(
    groups: list[dict[str, Any]], live: list[torch.Tensor], by_param: dict[int, str], out_dir: Path, result: LoadResult,
) -> None:
    try:
        saved_groups = json.loads((out_dir / PARAM_GROUPS_NAME).read_text())["param_groups"]
    except (OSError, ValueError, KeyError) as e:
        raise BadInputError(f"{out_dir / PARAM_GROUPS_NAME}: cannot read the saved param groups ({e}); "
                            "use hyperparameters='live'") from e
    of_name = {n: g for g in saved_groups for n in g.get("params", [])}
    for k, g in enumerate(groups):
        names = [by_param.get(id(live[i])) for i in g["params"]]  # state_dict() ids index ``live``
        found = [of_name[n] for n in names if n in of_name]
        if not found:
            continue
        settings = {json.dumps({h: v for h, v in s.items() if h not in _NOT_HYPER}, sort_keys=True) for s in found}
        if len(settings) > 1:
            result.notes.append(f"live group {k} holds parameters from saved groups with different settings; "
                                "kept its live hyperparameters")
            continue
        for h, v in found[0].items():
            if h in _NOT_HYPER or h not in g:
                continue
            g[h] = tuple(v) if isinstance(g[h], tuple) and isinstance(v, list) else v


__all__ = ["LoadResult", "load_optimizer_state"]
