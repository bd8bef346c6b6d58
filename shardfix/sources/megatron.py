"""Megatron-core ``torch_dist`` checkpoints: an ``iter_XXXXXXX/`` directory.

The directory is a DCP save (``.metadata`` plus ``__{rank}_{k}.distcp``) with two Megatron
files beside it: ``metadata.json`` (``{"sharded_backend": "torch_dist", ...}``) and
``common.pt``, a ``torch.save`` pickle of everything that is not sharded (iteration, versions,
the optimizer's param groups). This module wraps :class:`~shardfix.sources.dcp.DcpSource` and
only changes how entries are *presented*, so the classifier in
:mod:`shardfix.reconcile.keys` understands them; tensor reads go straight to the DCP reader and
every entry keeps its DCP key (the ledger's source key):

* ``optimizer.state.<state>.<param key>`` (the distributed optimizer, ``fully_reshardable``:
  state name *before* the parameter) -> path ``("optim", "state", <param key>, <state>)``;
* ``optimizer.distributed.…`` (``dp_reshardable`` flat bucket buffers and the per-DP-group
  optimizer objects) -> non-tensor entries under ``("megatron", …)`` that are never read as
  tensors: which parameter owns which range of a bucket depends on the grad-buffer layout,
  which the checkpoint does not save. A note says to save ``fully_reshardable`` instead;
* ``<name>._extra_state/shard_<i>_<n>`` (bytes) -> non-tensor entries of the model, recorded
  in the ledger and never written;
* every other tensor -> path ``("model", key)``;
* ``common.pt`` -> one non-tensor entry per leaf (key ``common.<path>``); its
  ``optimizer.param_groups`` become ``("optim", "param_groups", i, hyperparameter)``.

Stacked layers (``decoder.layers.<…>`` with a leading layer axis) are unstacked by the
``megatron`` profile (:mod:`shardfix.inspect.profiles.megatron`), not here, so each cut is a ledger
action and optimizer moments follow their parameter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch

from shardfix.errors import BadInputError
from shardfix.io.regular import is_regular
from shardfix.sources import dcp
from shardfix.sources.base import ObjectEntry, PathPart, SourceIndex, TensorEntry
from shardfix.sources.megatron_common import load_common

NAME = "megatron"
DESCRIBE = "a Megatron-core torch_dist iter_XXXXXXX directory (metadata.json, .metadata, common.pt)"

_OPT_STATE = "optimizer.state."
_DP_RESHARDABLE = "optimizer.distributed."
_EXTRA = "._extra_state"

DP_RESHARDABLE_NOTE = (
    "Megatron distributed-optimizer state saved dp_reshardable (flat per-bucket buffers "
    "optimizer.distributed.*): not converted, because which range of a bucket belongs to which parameter "
    "depends on the grad-buffer layout, which the checkpoint does not save; the model is converted without "
    "moments. To convert the moments, save with metadata['distrib_optim_sharding_type'] = 'fully_reshardable' "
    "(Megatron-LM: --dist-ckpt-optim-fully-reshardable)"
)


def _backend(path: Path) -> str | None:
    if not is_regular(path / "metadata.json"):
        return None
    try:
        data = json.loads((path / "metadata.json").read_text())
    except (OSError, ValueError):
        return None
    return data.get("sharded_backend") if isinstance(data, dict) else None


def detect(path: Path) -> bool:
    """A directory with ``metadata.json`` naming the ``torch_dist`` backend, ``.metadata`` and ``common.pt``."""
    return (path.is_dir() and (path / ".metadata").is_file() and (path / "common.pt").is_file()
            and _backend(path) == "torch_dist")


def open(path: Path, trust_pickle: bool = False) -> MegatronSource:  # noqa: A001 - registry verb
    return MegatronSource(path, trust_pickle=trust_pickle)


def _tensor_path(key: str) -> tuple[PathPart, ...]:
    if key.startswith(_OPT_STATE):
        state, _, param = key[len(_OPT_STATE):].partition(".")
        if state and param:
            return ("optim", "state", param, state)
    return ("model", key)


def _buffer_entry(e: TensorEntry) -> ObjectEntry:
    return ObjectEntry(e.key, ("megatron", e.key), None,
                       f"Megatron dp_reshardable flat optimizer buffer {e.dtype} {list(e.shape)}; not converted "
                       "(save fully_reshardable)")


def _object_path(e: ObjectEntry) -> tuple[PathPart, ...]:
    if e.key.startswith(_DP_RESHARDABLE):
        return ("megatron", e.key)
    if _EXTRA in e.key:
        return ("model", e.key)
    return ("megatron", e.key)


def _common_entries(tree: Any, prefix: tuple[PathPart, ...] = ()) -> list[ObjectEntry]:
    """One entry per leaf of ``common.pt``; param groups in the classifier's ``optim`` form."""
    if isinstance(tree, dict) and tree and all(isinstance(k, (str, int)) for k in tree):
        out: list[ObjectEntry] = []
        for k, v in tree.items():
            out += _common_entries(v, (*prefix, k))
        return out
    if prefix[-1:] == ("param_groups",) and isinstance(tree, list):
        out = []
        for i, group in enumerate(tree):
            items = group.items() if isinstance(group, dict) else [("value", group)]
            for hp, v in items:
                out.append(ObjectEntry("common." + ".".join(map(str, (*prefix, i, hp))), ("optim", "param_groups", i, hp),
                                       v, type(v).__name__))
        return out
    key = "common." + ".".join(map(str, prefix))
    return [ObjectEntry(key, ("megatron", *prefix), tree, type(tree).__name__)]


class MegatronSource:
    """A Megatron ``torch_dist`` iteration directory, read through the DCP reader."""

    format: ClassVar[str] = NAME

    def __init__(self, path: Path, trust_pickle: bool = False) -> None:
        self.path = path
        self._dcp = dcp.DcpSource(path, trust_pickle=trust_pickle)
        inner = self._dcp.index
        entries: list[TensorEntry | ObjectEntry] = []
        buffers = 0
        for e in inner.entries:
            if isinstance(e, TensorEntry):
                if e.key.startswith(_DP_RESHARDABLE):
                    entries.append(_buffer_entry(e))
                    buffers += 1
                    continue
                e.path = _tensor_path(e.key)
            else:
                e.path = _object_path(e)
                if _EXTRA in e.key:
                    e.type_name = f"Megatron _extra_state ({e.type_name}); recorded, not a tensor"
            entries.append(e)
        common = load_common(path / "common.pt")
        entries += _common_entries(common)
        self._check_common(common, buffers)
        notes = list(inner.notes) + ([DP_RESHARDABLE_NOTE] if buffers else [])
        self.index = SourceIndex(path=path, format=NAME, files=[*inner.files, path / "common.pt", path / "metadata.json"],
                                 total_bytes=inner.total_bytes + (path / "common.pt").stat().st_size, entries=entries,
                                 notes=notes, warnings=[DP_RESHARDABLE_NOTE] if buffers else [])
        self._tensors = {e.key for e in entries if isinstance(e, TensorEntry)}

    def _check_common(self, common: Any, buffers: int) -> None:
        kind = _find(common, "param_state_sharding_type")
        if kind is not None and kind not in ("fully_reshardable", "dp_reshardable"):
            raise BadInputError(
                f"{self.path / 'common.pt'}: distributed optimizer saved as {kind!r}; shardfix reads "
                "'fully_reshardable' (and recognises 'dp_reshardable'); save again with that sharding type"
            )

    def read_tensor(self, key: str) -> torch.Tensor:
        if key not in self._tensors:
            raise BadInputError(f"{self.path}: {key!r} is not a tensor shardfix converts")
        return self._dcp.read_tensor(key)

    def byte_ranges(self, key: str) -> Any:
        return self._dcp.byte_ranges(key) if key in self._tensors else None

    def close(self) -> None:
        self._dcp.close()


def _find(tree: Any, name: str) -> Any:
    """The first value stored under ``name`` anywhere in nested dicts."""
    if isinstance(tree, dict):
        if name in tree:
            return tree[name]
        for v in tree.values():
            found = _find(v, name)
            if found is not None:
                return found
    return None
