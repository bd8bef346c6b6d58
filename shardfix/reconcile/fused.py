"""Fused-weight rules: split ``qkv_w`` / ``qkvo_w`` / banks, and write transposed weights ``[out, in]``.

Two kinds of data drive a split, both declarative:

* a **layout** (``LAYOUTS``): a pure function from a tensor's shape and the checkpoint's
  :class:`~shardfix.reconcile.arch.Dims` to its *pieces* -- a label (``q``, ``k``, ``v``, ``o``,
  ``fc``, ``proj``, ``weight``), the ops that cut it out, and for banks the layer it belongs to.
  Bank slots and rows that are padding become drop actions with a reason, never outputs.
* a **name table** (:class:`SplitRule`): for a source pattern (``{i}`` = a layer index) the
  output name of each piece of one layer, in storage order; ``"none"`` drops a piece. Each
  profile ships one; ``--key-map FILE`` (TOML, read by ``shardfix.targets.rules_files``) overrides it.

Pieces are listed in storage order, so the outputs of one source concatenate back to it (after
undoing a piece's transpose), padding aside. :func:`split_parts` is the planner's hook;
:func:`source_targets` translates target shapes named after split outputs back to their source
tensors; :func:`check_outputs` looks at every output once (name clashes, unused key-map
entries, the architecture check).
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from shardfix.reconcile import ops as O
from shardfix.reconcile.arch import ArchConfig, AttnRule, Dims, check_architecture
from shardfix.reconcile.fused_layouts import DROP_NAMES, LAYOUTS, Cut, Drop, Part, Piece  # noqa: F401 - re-exported
from shardfix.reconcile.padding import ShapeFix, reconcile_shape

# -- name tables and the key map ------------------------------------------------------------------

@functools.lru_cache(maxsize=512)
def _pattern(pattern: str) -> re.Pattern[str]:
    # ``{name}``: the rest of a dotted name that does not start with a layer index
    rx = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{name\}", r"(?P<name>(?!\d+\.)[^/]+)")
    return re.compile(rx + r"\Z")


def match_pattern(pattern: str, name: str) -> dict[str, str] | None:
    """``{"i": "3"}`` when ``name`` fits ``pattern`` (``{i}`` = a layer index), else None."""
    m = _pattern(pattern).match(name)
    return m.groupdict() if m else None


@dataclass(frozen=True, slots=True)
class SplitRule:
    """Source ``pattern`` -> one output name per piece of a layer (``"none"`` drops the piece), cut
    by ``layout``. ``{i}`` in an output is the layer: captured from the source name, or the bank slot."""

    pattern: str
    layout: str
    outputs: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"SplitRule {self.pattern!r}: unknown layout {self.layout!r}")


@dataclass(frozen=True, slots=True)
class KeyMap:
    """``--key-map FILE``: ``{source pattern: [output names]}``; an empty list drops the tensor."""

    path: str
    entries: tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(slots=True)
class Splitter:
    """Everything the hook needs, decided once per plan: the active profile's name table and
    attention names, the checkpoint's dims, the key map, the config for the architecture check."""

    profile: str
    rules: tuple[SplitRule, ...] = ()
    attention: tuple[AttnRule, ...] = ()
    dims: Dims = field(default_factory=Dims)
    key_map: KeyMap | None = None
    split_fused: bool = False
    config: ArchConfig | None = None
    config_problems: list[str] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Whether any tensor can be renamed or split (``--split-fused`` or ``--key-map``)."""
        return self.split_fused or self.key_map is not None

    def rule_for(self, name: str) -> tuple[SplitRule, dict[str, str], str] | None:
        """The rule that names ``name``'s outputs: a key-map entry first (cut by the profile's layout
        for that tensor), then, with ``--split-fused``, the profile's own table."""
        if self.key_map is not None:
            for pattern, outputs in self.key_map.entries:
                cap = match_pattern(pattern, name)
                if cap is not None:
                    base = next((r for r in self.rules if match_pattern(r.pattern, name) is not None), None)
                    return SplitRule(pattern, base.layout if base else "auto", outputs), cap, f"--key-map {self.key_map.path}"
        if self.split_fused:
            for rule in self.rules:
                cap = match_pattern(rule.pattern, name)
                if cap is not None:
                    return rule, cap, f"profile {self.profile}"
        return None


def _fill(template: str, layer: int | None, cap: dict[str, str]) -> str | None:
    if "{name}" in template:
        if "name" not in cap:
            return None
        template = template.replace("{name}", cap["name"])
    i = str(layer) if layer is not None else cap.get("i")
    if "{i}" in template:
        return None if i is None else template.replace("{i}", i)
    return template


def split_parts(name: str, shape: tuple[int, ...], opts: Any, targets: Any, splitter: Splitter | None = None
                ) -> list[Part] | Drop | str | None:
    """The parts of ``name`` (shape after any padding fix), in storage order; None when no rule
    names it; :class:`Drop` when its table maps it to nothing; a problem string otherwise.

    A part whose name ``targets`` gives a shape for is reconciled to it (``--vocab-size`` and
    padding rules apply to the part); with a complete target (``--target-model``) a part the
    target lacks is a problem.
    """
    if splitter is None or not splitter.active:
        return None
    found = splitter.rule_for(name)
    if found is None:
        return None
    rule, cap, origin = found
    if not rule.outputs:
        return Drop(f"{origin} maps {rule.pattern!r} to no output")
    cut = LAYOUTS[rule.layout](tuple(shape), splitter.dims, len(rule.outputs))
    if isinstance(cut, str):
        return f"{name}: shape {list(shape)}: {cut} ({origin}, layout {rule.layout})"
    if len(rule.outputs) != len(cut.labels):
        return (f"{name}: {origin} gives {len(rule.outputs)} output name(s) for {rule.pattern!r} but it has "
                f"{len(cut.labels)} part(s) per layer ({', '.join(cut.labels)}); list one name per part, \"none\" to drop one")
    parts: list[Part] = []
    drops: list[dict[str, Any]] = list(cut.dropped)
    problems: list[str] = []
    for piece in cut.pieces:
        template = rule.outputs[cut.labels.index(piece.label)]
        if template.lower() in DROP_NAMES:
            drops.append({"action": "drop", "rule": origin, "part": piece.label, "layer": piece.layer,
                          "shape": list(O.out_shape(tuple(shape), piece.ops)),
                          "reason": f"{origin} maps part {piece.label} to none"})
            continue
        out = _fill(template, piece.layer, cap)
        if out is None:
            return f"{name}: output name {template!r} ({origin}) uses {{i}} but {rule.pattern!r} captures no layer index"
        part = Part(out, list(piece.ops), list(piece.actions))
        fix = _fit_target(part, tuple(O.out_shape(tuple(shape), piece.ops)), name, opts, targets)
        if isinstance(fix, str):
            problems.append(fix)
        parts.append(part)
    if problems:
        return "; ".join(problems)
    if not parts:
        return Drop(f"{origin} maps every part of {name} to none")
    head: list[dict[str, Any]] = []
    if len(cut.pieces) > 1 or drops:
        head.append({"action": "split", "rule": f"{origin}: {cut.what}", "layout": rule.layout,
                     "parts": [p.name for p in parts]})
    elif parts[0].name != name:
        head.append({"action": "rename", "from": name, "to": parts[0].name, "rule": origin})
    parts[0].actions[:0] = head + drops
    return parts


def _fit_target(part: Part, shape: tuple[int, ...], source: str, opts: Any, targets: Any) -> str | None:
    """Reconcile a part to the target shape named after it (appending ops), or a problem."""
    shapes = getattr(targets, "shapes", None) or {}
    want = shapes.get(part.name)
    if want is None:
        if getattr(targets, "complete", False) and part.name != source:
            origin = targets.origins.get("shapes", "the target model")
            return f"{part.name} (split from {source}): not in {origin}; pass --key-map to name it after the target"
        return None
    if tuple(want) == shape:
        return None
    fix = reconcile_shape(part.name, shape, tuple(want), vocab=getattr(targets, "vocab", None),
                          allow_grow=getattr(opts, "allow_grow", False), grow_init=getattr(opts, "grow_init", "mean"))
    if isinstance(fix, str):
        return f"{fix} (split from {source})"
    assert isinstance(fix, ShapeFix)
    part.ops += fix.ops
    part.actions += fix.actions
    return None


def source_targets(targets: Any, shapes: Mapping[str, tuple[int, ...]], opts: Any, splitter: Splitter) -> Any:
    """Target shapes as the planner's source-side rules need them.

    Targets name the *target model's* tensors. A single output made by renaming (and maybe
    transposing) a source tensor gets its target translated back to the source name, so vocab
    and padding rules trim the source before the rename; targets for the parts of a split
    tensor are checked part by part in :func:`split_parts`, and the fused source is given its
    own shape (so a complete target does not call it unknown).
    """
    if not splitter.active or not targets.shapes:
        return targets
    new = dict(targets.shapes)
    for name, shape in shapes.items():
        res = split_parts(name, shape, opts, None, splitter)
        if isinstance(res, Drop):
            if targets.complete:
                new.setdefault(name, tuple(shape))
            continue
        if not isinstance(res, list):
            continue
        if len(res) == 1 and all(op["op"] == "transpose" for op in res[0].ops):
            out = res[0].name
            if out in targets.shapes:
                want = tuple(targets.shapes[out])
                if out != name and out not in shapes:
                    new.pop(out, None)
                new[name] = tuple(reversed(want)) if len(res[0].ops) % 2 else want
            elif targets.complete:
                new.setdefault(name, tuple(shape))
            continue
        for p in res:
            if p.name not in shapes:
                new.pop(p.name, None)
        if targets.complete:
            new[name] = tuple(shape)
    return replace(targets, shapes=new)


def check_outputs(outputs: Mapping[str, list[tuple[str, tuple[int, ...]]]], splitter: Splitter | None) -> list[str]:
    """Look at every model output once: two sources writing one name, key-map entries that match
    nothing, and -- with a config -- the architecture check on every attention tensor."""
    if splitter is None:
        return []
    problems: list[str] = []
    writers: dict[str, list[str]] = defaultdict(list)
    for src, outs in outputs.items():
        for name, _ in outs:
            writers[name].append(src)
    for name, srcs in writers.items():
        if len(srcs) > 1:
            problems.append(f"{name}: written from {', '.join(sorted(set(srcs)))}; give each output its own name "
                            "(--key-map)")
    if splitter.key_map is not None:
        for pattern, _ in splitter.key_map.entries:
            if not any(match_pattern(pattern, src) is not None for src in outputs):
                problems.append(f"--key-map {splitter.key_map.path}: {pattern!r} matches no tensor of the checkpoint "
                                "(names are compared after prefix stripping)")
    if splitter.config is not None:
        problems += splitter.config_problems
        flat = {name: tuple(shape) for outs in outputs.values() for name, shape in outs}
        problems += check_architecture(flat, splitter.config, splitter.attention)
    return problems
