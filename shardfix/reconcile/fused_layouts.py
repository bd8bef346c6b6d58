"""Fused-weight layouts: pure functions from a tensor's shape and the checkpoint's
:class:`~shardfix.reconcile.arch.Dims` to its *pieces* (a label, the ops that cut it out, and for
banks the layer it belongs to), registered in :data:`LAYOUTS` by the name a
:class:`~shardfix.reconcile.fused.SplitRule` uses. Bank slots and rows that are padding become drop
actions with a reason, never outputs. A new layout is one function plus one entry in :data:`LAYOUTS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shardfix.reconcile import ops as O
from shardfix.reconcile.arch import Dims

#: an output name that drops its piece (TOML has no null).
DROP_NAMES = ("none", "")


@dataclass(slots=True)
class Part:
    """One output made from a source tensor: its name, the ops after the shape fix, actions."""

    name: str
    ops: list[dict[str, Any]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Drop:
    """The hook's answer for a tensor the name table maps to no output at all."""

    reason: str


@dataclass(slots=True)
class Piece:
    """One cut of a fused tensor: ``label`` within its layer, the ops, the layer (banks)."""

    label: str
    ops: list[dict[str, Any]]
    layer: int | None = None
    actions: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class Cut:
    """A layout's answer: the labels of one layer's pieces, every piece in storage order, and
    what was left out as padding (drop actions with reasons)."""

    labels: tuple[str, ...]
    pieces: list[Piece]
    what: str
    dropped: list[dict[str, Any]] = field(default_factory=list)


Layout = Callable[[tuple[int, ...], Dims, int], "Cut | str"]


# -- layouts ----------------------------------------------------------------------------------------

def _transpose_note(shape: tuple[int, ...], why: str) -> dict[str, Any]:
    return {"action": "transpose", "rule": why, "from": list(shape), "to": list(reversed(shape))}


def _labelled(labels: tuple[str, ...], ops: list[list[dict[str, Any]]], what: str) -> Cut:
    return Cut(labels, [Piece(label, o) for label, o in zip(labels, ops, strict=True)], what)


def _qkv(shape: tuple[int, ...], dims: Dims, n: int) -> Cut | str:
    """``qkv_w``: ``[3, hdim, dim]`` (or flattened ``[3 * hdim, dim]``) -> q, k, v ``[hdim, dim]``."""
    if len(shape) == 3 and shape[0] == 3:
        return _labelled(("q", "k", "v"), [[O.select(0, j)] for j in range(3)], "q, k, v stacked on dim 0")
    if len(shape) == 2 and shape[0] % 3 == 0:
        r = shape[0] // 3
        return _labelled(("q", "k", "v"), [[O.narrow(0, j * r, r)] for j in range(3)], "q, k, v concatenated on dim 0")
    return f"expected [3, heads*head_dim, dim] (q, k, v stacked), got {list(shape)}"


def _qkvo(shape: tuple[int, ...], dims: Dims, n: int) -> Cut | str:
    """``qkvo_w`` in any of its storage shapes -> q, k, v, o ``[hdim, dim]``.

    ``[4, hdim, dim]``, ``[hdim, 4 * dim]`` and ``[4 * dim, hdim]`` hold the same bytes: the
    training code always reads them through ``.view(4, hdim, dim)`` (and asserts hdim == dim, so
    ``o`` is the ``[dim, hdim]`` output weight as stored).
    """
    labels = ("q", "k", "v", "o")
    if len(shape) == 3 and shape[0] == 4:
        return _labelled(labels, [[O.select(0, j)] for j in range(4)], "q, k, v, o stacked on dim 0 of [4, hdim, dim]")
    if len(shape) != 2:
        return f"expected [4, hdim, dim], [hdim, 4 * dim] or [4 * dim, hdim] (q, k, v, o), got {list(shape)}"
    d = dims.dim
    if d is None:
        if shape[1] == 4 * shape[0]:
            d = shape[0]
        elif shape[0] == 4 * shape[1]:
            d = shape[1]
        else:
            return f"cannot tell the model dim of {list(shape)} (no embedding found); pass --target-config"
    numel = shape[0] * shape[1]
    h = numel // (4 * d)
    if numel % (4 * d) or sorted(shape) != sorted((h, 4 * d)):
        return f"expected [{h}, {4 * d}] or [{4 * d}, {h}] for q, k, v, o of model dim {d}, got {list(shape)}"
    form = f"[hdim, 4 * dim] = {list(shape)}" if shape == (h, 4 * d) else f"[4 * dim, hdim] = {list(shape)}"
    base = O.reshape([4, h, d])
    return _labelled(labels, [[base, O.select(0, j)] for j in range(4)], f"q, k, v, o stored as {form}, read as "
                     f"view(4, {h}, {d})")


def _oriented(shape: tuple[int, ...], dims: Dims, in_is_dim: bool, label: str) -> Cut | str:
    """A single ``[out, in]`` weight whose in (``fc``, ``head``) or out (``proj``) dim is the model dim;
    stored the other way round, it is transposed."""
    if len(shape) != 2:
        return f"expected a 2-D weight, got {list(shape)}"
    d = dims.dim
    if d is None:
        return "cannot tell the model dim (no embedding found); pass --target-config"
    a, b = shape
    side = "in" if in_is_dim else "out"
    if (b if in_is_dim else a) == d:
        return Cut((label,), [Piece(label, [])], f"[out, in] with {side} = model dim {d}")
    if (a if in_is_dim else b) == d:
        piece = Piece(label, [O.transpose(0, 1)], actions=[_transpose_note(shape, "stored [in, out]; written [out, in]")])
        return Cut((label,), [piece], f"stored [in, out] {list(shape)}, written [out, in]")
    return f"neither dim of {list(shape)} is the model dim {d}"


def _real_slots(slots: int, real: int | None, origin: str | None, unit: str) -> int | str:
    """How many leading bank slots are layers (the rest are padding), or why that is unknown."""
    if real is None:
        return (f"cannot tell which of its {slots} slots are layers and which are padding (the layer count is "
                "unknown); pass --target-config with num_hidden_layers")
    if real > slots:
        return (f"has {slots} slots for {real} layers ({origin}): a layer without {unit} cannot be located from "
                "shapes; convert without --split-fused to keep the bank whole")
    return real


def _drop_slots(name: str, shape: tuple[int, ...], real: int, origin: str | None, unit: str) -> list[dict[str, Any]]:
    return [{"action": "drop", "rule": "padding-layer", "index": s, "shape": list(shape[1:]),
             "reason": f"{name} slot {s} of {shape[0]} is padding: {real} {unit} ({origin}); the rest pad the bank "
                       "so its matrices divide evenly across GPUs"} for s in range(real, shape[0])]


def _drop_rows(name: str, shape: tuple[int, ...], real: int, used: str) -> list[dict[str, Any]]:
    if shape[0] <= real:
        return []
    return [{"action": "drop", "rule": "padding-rows", "rows": [real, shape[0]], "shape": [shape[0] - real, *shape[1:]],
             "reason": f"{name} rows {real}..{shape[0] - 1} are zero padding: {used}; the rest round the bank up to a "
                       "multiple of the world size"}]


def _attn_bank(shape: tuple[int, ...], dims: Dims, n: int) -> Cut | str:
    """``attn_bank`` ``[slots, 4 * dim, hdim]``: per layer q, k, v, o; padding slots dropped."""
    if len(shape) != 3:
        return f"expected [slots, 4 * dim, hdim], got {list(shape)}"
    origin = dims.origins.get("attn_layers") or dims.origins.get("layers")
    real = _real_slots(shape[0], dims.attn_layers or dims.layers, origin, "attention")
    if isinstance(real, str):
        return real
    slot = _qkvo(shape[1:], dims, 4)
    if isinstance(slot, str):
        return slot
    pieces = [Piece(p.label, [O.select(0, s), *p.ops], s) for s in range(real) for p in slot.pieces]
    return Cut(slot.labels, pieces, f"{real} layers of q, k, v, o in a bank of {shape[0]} slots",
               _drop_slots("attn_bank", shape, real, origin, "layers hold attention"))


def _mlp_bank(shape: tuple[int, ...], dims: Dims, n: int) -> Cut | str:
    """``mlp_bank`` ``[slots, 2, hidden, dim]``: per layer ``fc`` ``[hidden, dim]`` and ``proj``
    (stored ``[hidden, dim]`` and used as ``x @ W``, written ``[dim, hidden]``); padding dropped."""
    if len(shape) != 4 or shape[1] != 2:
        return f"expected [slots, 2, hidden, dim], got {list(shape)}"
    real = _real_slots(shape[0], dims.layers, dims.origins.get("layers"), "an MLP")
    if isinstance(real, str):
        return real
    pieces = []
    for s in range(real):
        pieces.append(Piece("fc", [O.select(0, s), O.select(0, 0)], s))
        pieces.append(Piece("proj", [O.select(0, s), O.select(0, 1), O.transpose(0, 1)], s,
                            [_transpose_note(shape[2:], "proj stored [in, out] in the bank; written [out, in]")]))
    return Cut(("fc", "proj"), pieces, f"{real} layers of fc, proj in a bank of {shape[0]} slots",
               _drop_slots("mlp_bank", shape, real, dims.origins.get("layers"), "layers"))


def _qk_bank(shape: tuple[int, ...], dims: Dims, n: int) -> Cut | str:
    """``qk_bank`` ``[groups, 2 * head_dim, dim]``: per layer ``heads`` groups hold the q heads then the
    k heads; rows past the real groups are zero padding to a multiple of the world size."""
    if len(shape) != 3 or shape[1] % 2:
        return f"expected [groups, 2 * head_dim, dim], got {list(shape)}"
    hd, d = shape[1] // 2, shape[2]
    heads = dims.heads or ((dims.hdim or d) // hd if (dims.hdim or d) % hd == 0 else None)
    layers = dims.attn_layers or dims.layers
    if heads is None or layers is None:
        return "needs the head count and the layer count; pass --target-config"
    real = layers * heads
    if real > shape[0]:
        return f"has {shape[0]} groups but {layers} layers x {heads} heads need {real}"
    pieces = []
    for layer in range(layers):
        base = [O.narrow(0, layer * heads, heads), O.reshape([2 * heads * hd, d])]
        pieces.append(Piece("q", [*base, O.narrow(0, 0, heads * hd)], layer))
        pieces.append(Piece("k", [*base, O.narrow(0, heads * hd, heads * hd)], layer))
    return Cut(("q", "k"), pieces, f"{layers} layers of q, k ({heads} heads of {hd}) in {shape[0]} groups",
               _drop_rows("qk_bank", shape, real, f"{layers} layers x {heads} heads use {real} groups"))


def _vo_bank(shape: tuple[int, ...], dims: Dims, n: int) -> Cut | str:
    """``vo_bank`` ``[slots, hdim, dim]``: per layer v then o; slots past ``2 * layers`` are zero padding."""
    if len(shape) != 3:
        return f"expected [slots, hdim, dim], got {list(shape)}"
    layers = dims.attn_layers or dims.layers
    if layers is None:
        return "needs the layer count; pass --target-config with num_hidden_layers"
    real = 2 * layers
    if real > shape[0]:
        return f"has {shape[0]} slots but {layers} layers need {real}"
    pieces = []
    for layer in range(layers):
        pieces.append(Piece("v", [O.select(0, 2 * layer)], layer))
        pieces.append(Piece("o", [O.select(0, 2 * layer + 1)], layer))
    return Cut(("v", "o"), pieces, f"{layers} layers of v, o in {shape[0]} slots",
               _drop_rows("vo_bank", shape, real, f"{layers} layers use {real} slots (v, o each)"))


def _hf_qkv(shape: tuple[int, ...], dims: Dims, n: int) -> Cut | str:
    """``qkv_proj`` ``[(heads + 2 kv_heads) * head_dim, hidden]`` -> q, k, v (grouped-query aware)."""
    if len(shape) != 2:
        return f"expected [(heads + 2 * kv_heads) * head_dim, hidden], got {list(shape)}"
    H, hd = dims.heads, dims.head_dim
    if H is None or hd is None:
        return "needs num_attention_heads, num_key_value_heads and head_dim to cut q, k, v; pass --target-config"
    KV = dims.kv_heads or H
    if (H + 2 * KV) * hd != shape[0]:
        return f"({H} + 2 x {KV}) heads x {hd} = {(H + 2 * KV) * hd} rows expected, got {shape[0]}"
    q, kv = H * hd, KV * hd
    return _labelled(("q", "k", "v"), [[O.narrow(0, 0, q)], [O.narrow(0, q, kv)], [O.narrow(0, q + kv, kv)]],
                     f"q ({H} heads), k, v ({KV} heads) of {hd} concatenated on dim 0")


def _chunks(shape: tuple[int, ...], dims: Dims, n: int) -> Cut | str:
    if not shape or shape[0] % n:
        return f"dim 0 of {list(shape)} does not split into {n} equal parts"
    r = shape[0] // n
    labels = tuple(f"part{j}" for j in range(n))
    return _labelled(labels, [[O.narrow(0, j * r, r)] for j in range(n)], f"{n} equal parts of dim 0")


def _layers(shape: tuple[int, ...], dims: Dims, n: int) -> Cut | str:
    """Layers stacked on a leading axis ``[L, ...]`` (Megatron's homogeneous layers) -> one tensor per layer."""
    if not shape:
        return "expected a leading layer axis, got a 0-d tensor"
    return Cut(("weight",), [Piece("weight", [O.select(0, i)], i) for i in range(shape[0])],
               f"{shape[0]} layers stacked on dim 0")


def _rename(shape: tuple[int, ...], dims: Dims, n: int) -> Cut | str:
    return Cut(("weight",), [Piece("weight", [])], "renamed")


def _auto(shape: tuple[int, ...], dims: Dims, n: int) -> Cut | str:
    """A key-map entry for a tensor the profile does not know: rename, or cut dim 0 evenly."""
    if n == 1:
        return _rename(shape, dims, n)
    if shape and shape[0] == n:
        return _labelled(tuple(f"part{j}" for j in range(n)), [[O.select(0, j)] for j in range(n)], f"{n} slices of dim 0")
    return _chunks(shape, dims, n)


LAYOUTS: dict[str, Layout] = {
    "qkv": _qkv,
    "qkvo": _qkvo,
    "fc": lambda s, d, n: _oriented(s, d, True, "fc"),
    "head": lambda s, d, n: _oriented(s, d, True, "weight"),
    "proj": lambda s, d, n: _oriented(s, d, False, "proj"),
    "attn_bank": _attn_bank,
    "mlp_bank": _mlp_bank,
    "qk_bank": _qk_bank,
    "vo_bank": _vo_bank,
    "hf_qkv": _hf_qkv,
    "halves": lambda s, d, n: _chunks(s, d, 2),
    "layers": _layers,
    "rename": _rename,
    "auto": _auto,
}
