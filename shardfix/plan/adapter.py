"""A PEFT LoRA checkpoint becomes a base model under plain names plus ``adapter/`` under PEFT's saved names.

Runs on a finished plan (names only): when every model tensor has a PEFT-wrapped name and some
are LoRA tensors, each base tensor is renamed to the name ``from_pretrained`` loads and each
adapter tensor to the name ``PeftModel.from_pretrained`` loads (:mod:`shardfix.outputs.peft`),
each rename a ledger action, and the adapter tensors move to the ``adapter`` set (one file,
``adapter/adapter_model.safetensors``). Optimizer state keeps the wrapped names, which is what
``load_optimizer_state`` matches against a live ``PeftModel``.

The adapter's ``adapter_config.json`` comes from ``--adapter-config`` or one beside the source; it
is checked against the tensors. Without one the error proposes what the tensors say and asks for
``lora_alpha``, which the weights do not record.
"""

from __future__ import annotations

from pathlib import Path

from shardfix.errors import BadInputError
from shardfix.options import ConvertOptions
from shardfix.outputs.hf import ADAPTER_CONFIG
from shardfix.outputs.hf_config import sidecar_candidates
from shardfix.outputs.hf_files import read_json_object
from shardfix.outputs.layout import ADAPTER, MODEL, Sidecar
from shardfix.outputs.peft import (
    check_adapter_config,
    classify,
    is_peft_name,
    missing_adapter_config_message,
    split_names,
)
from shardfix.plan.build import assign_files
from shardfix.plan.types import LedgerEntry, OutputTensor, Plan

ADAPTER_CONFIG_NAME = "adapter_config.json"


def is_peft_model(names: list[str]) -> bool:
    """Every name PEFT-wrapped and at least one a LoRA / ``modules_to_save`` tensor."""
    return bool(names) and all(map(is_peft_name, names)) and any(classify(n).kind == "adapter" for n in names)


def find_adapter_config(opts: ConvertOptions, src: Path, shapes: dict[str, tuple[int, ...]]) -> tuple[Path, str]:
    """``--adapter-config``, else an ``adapter_config.json`` beside the source; else exit 2 with the proposal."""
    if opts.adapter_config:
        return Path(opts.adapter_config), f"--adapter-config {opts.adapter_config}"
    for cand in map(Path, sidecar_candidates(src, src.is_dir(), ADAPTER_CONFIG_NAME)):
        if cand.is_file():
            return cand, f"{cand} (beside the source)"
    raise BadInputError(missing_adapter_config_message(shapes))


def _rename(entry: LedgerEntry | None, old: str, new: str, rule: str) -> None:
    if entry is None or old == new:
        return
    entry.outputs = [new if o == old else o for o in entry.outputs]
    entry.actions.append({"action": "rename", "from": old, "to": new, "rule": rule})


def split_adapter(plan: Plan, opts: ConvertOptions, src: Path) -> Sidecar | None:
    """Split a PEFT model's outputs into base and adapter (see the module docstring); None if not PEFT.

    Returns:
        The ``adapter/adapter_config.json`` sidecar (a copy of the config given or found).

    Raises:
        BadInputError: no adapter config, one that does not describe the tensors, or names PEFT
            would not write (several adapters, two sources for one name).
    """
    model: list[OutputTensor] = [t for f in plan.files_of(MODEL) for t in f.tensors]
    if not is_peft_model([t.name for t in model]):
        return None
    split = split_names([t.name for t in model])
    shapes = {t.name: tuple(t.shape) for t in model if t.name in split.adapter}
    cfg_path, origin = find_adapter_config(opts, src, shapes)
    check_adapter_config(read_json_object(cfg_path, origin), shapes, origin)
    ledger = {e.source: e for e in plan.ledger if e.origin is None}
    base: list[OutputTensor] = []
    adapter: list[OutputTensor] = []
    for t in model:
        if t.name in split.base:
            new, rule, into = split.base[t.name], "PEFT base model: the name from_pretrained loads", base
        else:
            new, into = split.adapter[t.name], adapter
            rule = f"PEFT adapter: the name adapter_model.safetensors holds (adapter {split.adapter_name!r} removed)"
        _rename(ledger.get(t.source), t.name, new, rule)
        t.name = new
        into.append(t)
    rest = [f for f in plan.files if f.set != MODEL]
    plan.files = (assign_files(base, MODEL, int(opts.max_shard_size))
                  + assign_files(adapter, ADAPTER, sum(t.nbytes for t in adapter) + 1) + rest)
    plan.findings["peft"] = {"adapter": split.adapter_name, "base_tensors": len(base), "adapter_tensors": len(adapter),
                             "adapter_config": origin}
    return Sidecar(ADAPTER_CONFIG, None, "PEFT adapter config", {"from": origin}, copy_from=str(cfg_path))
