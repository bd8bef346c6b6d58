"""Build the logical entries of a DeepSpeed ZeRO checkpoint from its parsed files.

Used by :class:`shardfix.sources.deepspeed.DeepSpeedSource` (the ``src`` argument below): its
``add`` registers a logical tensor from pieces of stored flat tensors, ``note`` says why a
stored tensor feeds nothing. The padding and partition arithmetic is in
:mod:`~shardfix.sources.deepspeed_layout`.
"""

from __future__ import annotations

from typing import Any

from shardfix.errors import BadInputError
from shardfix.sources import deepspeed_layout as L
from shardfix.sources.base import ObjectEntry, TensorEntry
from shardfix.sources.deepspeed_pickle import Stored, plain

Pieces = list[tuple[Stored, int, int]]
#: per parameter name: state name -> (shape, pieces)
States = dict[str, dict[str, tuple[tuple[int, ...], Pieces]]]


def _get(tree: Any, where: str, *keys: Any) -> Any:
    obj = tree
    for k in keys:
        try:
            obj = obj[k]
        except (KeyError, IndexError, TypeError):
            raise BadInputError(f"{where}: no {'.'.join(map(str, keys))} (stops at {k!r}); not a DeepSpeed ZeRO "
                                "checkpoint file shardfix understands") from None
    return obj


def _flat(obj: Any, where: str) -> Stored:
    if not isinstance(obj, Stored) or len(obj.shape) != 1 or not obj.is_flat():
        raise BadInputError(f"{where}: expected a flat 1-D tensor, found {plain(obj)!r}")
    return obj


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _shapes(m0: Any, where: str) -> list[list[tuple[str, tuple[int, ...]]]]:
    groups = _get(m0, where, "param_shapes")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise BadInputError(f"{where}: param_shapes is not a list of name -> shape maps")
    return [[(str(n), tuple(s)) for n, s in g.items()] for g in groups]


def _take(parts: list[Stored], pieces: list[L.Piece]) -> Pieces:
    return [(parts[p.rank], p.start, p.numel) for p in pieces]


def _scalar_states(src: Any, states: list[dict], names: list[str], out: States, where: str) -> None:
    """0-d state (``step``) of a group: rank 0's copy for each parameter; other ranks' are replicas."""
    for k, v in states[0].items():
        if isinstance(v, Stored) and v.shape == ():
            for name in names:
                out.setdefault(name, {})[k] = ((), [(v, 0, 1)])
            for st in states[1:]:
                if isinstance(st.get(k), Stored):
                    src.note(st[k], f"a replica of rank 0's {k}")


def zero12(src: Any, shapes: list[list[tuple[str, tuple[int, ...]]]], osds: list[dict], where: list[str]) -> tuple[
        dict[str, Pieces], States, list[dict]]:
    """fp32 masters and states of a ZeRO-1/2 checkpoint (``osds``: each rank's optimizer_state_dict)."""
    ws = src.world_size
    masters: dict[str, Pieces] = {}
    states: States = {}
    pads = osds[0].get("param_alignment_paddings")
    for g, group in enumerate(shapes):
        names = [n for n, _ in group]
        numels = [_numel(s) for _, s in group]
        parts = [_flat(_get(o, w, "single_partition_of_fp32_groups", g), w) for o, w in zip(osds, where, strict=True)]
        pad_g = _get(pads, where[0], g) if isinstance(pads, list) else None
        lay = L.zero12_pieces(g, numels, [p.numel for p in parts], ws, pad_g, "fp32 partitions")
        for name, pieces in zip(names, lay, strict=True):
            masters[name] = _take(parts, pieces)
        st = [_get(o, w, "base_optimizer_state", "state", g) for o, w in zip(osds, where, strict=True)]
        for k, v in st[0].items():
            if isinstance(v, Stored) and len(v.shape) == 1:
                ks = [_flat(_get(s, w, k), w) for s, w in zip(st, where, strict=True)]
                klay = L.zero12_pieces(g, numels, [p.numel for p in ks], ws, pad_g, f"{k} partitions")
                for (name, shape), pieces in zip(group, klay, strict=True):
                    states.setdefault(name, {})[k] = (shape, _take(ks, pieces))
        _scalar_states(src, st, names, states, where[0])
    return masters, states, _get(osds[0], where[0], "base_optimizer_state", "param_groups")


def zero3(src: Any, shapes: list[list[tuple[str, tuple[int, ...]]]], osds: list[dict], where: list[str]) -> tuple[
        dict[str, Pieces], States, list[dict]]:
    """fp32 masters and states of a ZeRO-3 checkpoint (every parameter partitioned on its own)."""
    ws = src.world_size
    flat = [(n, s) for group in shapes for n, s in group]
    numels = [_numel(s) for _, s in flat]
    parts = [[_flat(t, w) for t in _get(o, w, "fp32_flat_groups")] for o, w in zip(osds, where, strict=True)]
    lay = L.zero3_pieces(numels, [[t.numel for t in r] for r in parts], ws, "fp32 flat groups")
    masters = {n: [(parts[p.rank][p.part], p.start, p.numel) for p in pieces] for (n, _), pieces in zip(flat, lay,
                                                                                                         strict=True)}
    st = [_get(o, w, "optimizer_state_dict", "state") for o, w in zip(osds, where, strict=True)]
    subgroups = sorted(st[0])
    states: States = {}
    for k, v in _get(st[0], where[0], subgroups[0]).items() if subgroups else ():
        if isinstance(v, Stored) and len(v.shape) == 1:
            ks = [[_flat(_get(s, w, g, k), w) for g in subgroups] for s, w in zip(st, where, strict=True)]
            klay = L.zero3_pieces(numels, [[t.numel for t in r] for r in ks], ws, f"{k} partitions")
            for (name, shape), pieces in zip(flat, klay, strict=True):
                states.setdefault(name, {})[k] = (shape, [(ks[p.rank][p.part], p.start, p.numel) for p in pieces])
    for i, g in enumerate(subgroups):  # 0-d state: that of the sub-group holding the parameter's first piece
        names = [n for (n, _), pieces in zip(flat, lay, strict=True) if pieces and pieces[0].part == i]
        _scalar_states(src, [s[g] for s in st], names, states, where[0])
    return masters, states, _get(osds[0], where[0], "optimizer_state_dict", "param_groups")


def _frozen(src: Any, models: list[dict], where: list[str], skip: set[str]) -> dict[str, tuple[tuple[int, ...], Pieces]]:
    """Frozen parameters: ``frozen_param_fragments``, or (ZeRO-1 saves no fragments) the module's
    tensors that are neither trainable (``skip``) nor buffers, in the training dtype."""
    shapes = models[0].get("frozen_param_shapes") or {}
    out = {}
    if not shapes and src.stage <= 2:
        for name, t in (models[0].get("module") or {}).items():
            if isinstance(t, Stored) and name not in skip:
                out[str(name)] = (t.shape, [(t, 0, t.numel)])
        return out
    for name, shape in shapes.items():
        shape = tuple(shape)
        frags = [_get(m, w, "frozen_param_fragments", name) for m, w in zip(models, where, strict=True)]
        if src.stage <= 2:
            out[name] = (shape, [(frags[0], 0, _numel(shape))])
        else:
            flat = [_flat(f, w) for f, w in zip(frags, where, strict=True)]
            pieces = L.frozen3_pieces(_numel(shape), [f.numel for f in flat], src.world_size, name)
            out[name] = (shape, _take(flat, pieces))
    return out


def build_logical(src: Any, m0: dict, models: list[dict], osds: list[dict],
                  entries: list[TensorEntry | ObjectEntry]) -> None:
    """Add the model, optimizer state and param-group entries; note what the rest of the files is."""
    mwhere = [str(p) for p in src.model_files]
    owhere = [str(p) for p in src.optim_files]
    shapes = _shapes(m0, mwhere[0])
    build = zero12 if src.stage <= 2 else zero3
    masters, states, groups = build(src, shapes, osds, owhere)
    dims = {n: s for group in shapes for n, s in group}
    for name, pieces in masters.items():
        src.add(("model", name), pieces[0][0].dtype, dims[name], pieces, entries)
    buffers = [str(b) for b in m0.get("buffer_names") or []]
    frozen = _frozen(src, models, mwhere, set(masters) | set(buffers))
    for name, (shape, pieces) in frozen.items():
        src.add(("model", name), pieces[0][0].dtype, shape, pieces, entries)
    for name in buffers:
        b = _get(m0, mwhere[0], "module", name)
        src.add(("model", name), b.dtype, b.shape, [(b, 0, b.numel)], entries)
    for alias, target in (m0.get("shared_params") or {}).items():
        if target in masters:
            src.add(("model", str(alias)), masters[target][0][0].dtype, dims[target], masters[target], entries)
    for name, per in states.items():
        for k, (shape, pieces) in per.items():
            src.add(("optim", "state", name, k), pieces[0][0].dtype, shape, pieces, entries)
    for g, group in enumerate(groups):
        for h, value in group.items():
            if h == "params" and g < len(shapes):
                value = [n for n, _ in shapes[g]]
            entries.append(ObjectEntry(f"optim.param_groups.{g}.{h}", ("optim", "param_groups", g, h), plain(value),
                                       type(value).__name__))
    _note_module(src, models, set(buffers), set(frozen))


def _note_module(src: Any, models: list[dict], buffers: set[str], frozen: set[str]) -> None:
    for r, m in enumerate(models):
        for name, t in (m.get("module") or {}).items():
            if not isinstance(t, Stored):
                continue
            if name in buffers:
                src.note(t, "a replica of rank 0's buffer") if r else None
            elif src.stage == 3:
                src.note(t, f"a ZeRO-3 placeholder ({t.numel} elements); the parameter is assembled from the partitions")
            elif name in frozen:
                src.note(t, f"the same frozen parameter as frozen_param_fragments.{name}, which is read")
            else:
                src.note(t, f"the training-dtype ({t.dtype}) copy of a parameter; its fp32 master from the optimizer "
                            "partitions is read instead (cast with --dtype)")
