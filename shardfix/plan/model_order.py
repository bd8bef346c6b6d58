"""The model's parameter order, which naming integer-keyed optimizer state by group order needs.

torch.save and DCP sources keep the state dict's key order, which is ``named_parameters()``
order. A safetensors header is sorted by name, so for a model stored as safetensors (the
Trainer's ``model.safetensors``, accelerate's DDP ``save_state``) the order is derived: from a
``config.json`` beside the checkpoint whose ``model_type`` has a module order the ``hf`` profile
declares; otherwise every order a module tree with those names can have (a few hundred at
most, see :func:`shardfix.reconcile.group_order.tree_orders`); otherwise it is unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardfix.inspect.profiles import PROFILES, hf
from shardfix.plan.context import PlanContext
from shardfix.reconcile.group_order import declared_sort, tree_orders
from shardfix.sources import safetensors_src

Shape = tuple[int, ...]
#: candidate orders tried at most when only the module tree is known
TREE_ORDERS = 720


@dataclass(slots=True)
class ModelOrder:
    """Candidate model orders (one when known, none when unknown), where they come from, the declared grouping."""

    orders: list[list[tuple[str, Shape]]]
    source: str
    group_classes: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def _stored_sorted(ctx: PlanContext) -> bool:
    """Whether the model's tensors come from safetensors files (whose keys are sorted by name)."""
    if ctx.index.format == safetensors_src.NAME:
        return True
    keys = [t.entry.key for t in ctx.model.values()]
    return bool(keys) and all("/" in k and k.split("/", 1)[0].endswith(".safetensors") for k in keys)


def model_order(ctx: PlanContext) -> ModelOrder:
    """The orders the optimizer naming may assume, and the profile's declared optimizer grouping."""
    params = [(n, t.entry.shape) for n, t in ctx.model.items()]
    profile = PROFILES.get(ctx.splitter.profile) if ctx.splitter else None
    classes = profile.optimizer_groups if profile else ()
    if not _stored_sorted(ctx):
        return ModelOrder([params], "the checkpoint's key order", classes)
    shapes = dict(params)
    names = [n for n, _ in params]
    found = hf.sibling_config(ctx.index.path)
    declared = hf.declared_order(found[0]) if found else None
    if declared is not None:
        arch, templates = declared
        ordered = declared_sort(names, templates)
        if ordered is not None:
            return ModelOrder([[(n, shapes[n]) for n in ordered]],
                              f"{arch}'s module order (config.json; declared by the hf profile)", classes or hf.OPTIMIZER_GROUPS)
    trees = tree_orders(names, TREE_ORDERS)
    if trees is not None:
        return ModelOrder([[(n, shapes[n]) for n in o] for o in trees],
                          f"each of the {len(trees)} orders its module tree allows (safetensors stores names sorted)",
                          classes)
    why = ("safetensors stores tensors sorted by name, so the file does not record the model's order, and "
           + (f"config.json's model_type {found[0].get('model_type')!r} has no declared module order"
              if found and declared is None else "the names in config.json's module order do not cover the model"
              if declared is not None else "no config.json beside it names a known architecture"))
    return ModelOrder([], why, classes)
