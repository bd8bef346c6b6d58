"""PEFT LoRA names: which tensors of a wrapped model are the base model's, which the adapter's, under what names.

A model wrapped by ``peft.get_peft_model`` has ``state_dict()`` names such as::

    base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight     (frozen base weight)
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight (adapter "default")
    base_model.model.model.embed_tokens.lora_embedding_A.default           (a ParameterDict entry)
    base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight  (DoRA)
    base_model.model.lm_head.modules_to_save.default.weight / ...lm_head.original_module.weight

This module maps each to what the two clients load (pure, no I/O):

* the base model's plain name (``model.layers.0.self_attn.q_proj.weight``), which
  ``AutoModelForCausalLM.from_pretrained`` loads;
* the adapter name exactly as ``peft.get_peft_model_state_dict`` saves it into
  ``adapter_model.safetensors``: the ``base_model.model.`` prefix kept, the adapter name removed
  (``...q_proj.lora_A.weight``, ``...embed_tokens.lora_embedding_A``), DoRA's
  ``lora_magnitude_vector.<adapter>.weight`` saved as ``...lora_magnitude_vector`` and a
  ``modules_to_save`` copy saved under the module's own name (``base_model.model.lm_head.weight``).

It also proposes an ``adapter_config.json`` from shapes and names for the error message shown when
none is given; it never invents ``lora_alpha`` (the scale the adapter was trained with).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from shardfix.errors import BadInputError

PEFT_PREFIX = "base_model.model."
# LoraLayer.adapter_layer_names (peft/tuners/lora/layer.py): containers keyed by adapter name
MODULE_DICT_PARTS = ("lora_A", "lora_B", "lora_magnitude_vector")  # nn.ModuleDict: <part>.<adapter>.<param>
PARAM_DICT_PARTS = ("lora_embedding_A", "lora_embedding_B")         # nn.ParameterDict: <part>.<adapter>
LORA_PARTS = MODULE_DICT_PARTS + PARAM_DICT_PARTS


@dataclass(frozen=True)
class PeftName:
    """Where one wrapped name goes.

    Attributes:
        source: the name as the wrapped model's ``state_dict()`` has it.
        kind: ``"base"`` (a base-model tensor) or ``"adapter"``.
        name: the plain base-model name, or the adapter name as PEFT saves it.
        adapter: the adapter's name (``"default"``) for adapter tensors, else None.
        module: the targeted module's plain name (``model.layers.0.self_attn.q_proj``) for
            LoRA tensors and ``base_layer`` weights, else None.
        part: ``lora_A``, ``lora_B``, ``lora_embedding_A``, ``lora_embedding_B``,
            ``lora_magnitude_vector``, ``modules_to_save`` or ``base_layer``; None for other tensors.
    """

    source: str
    kind: str
    name: str
    adapter: str | None = None
    module: str | None = None
    part: str | None = None


def is_peft_name(name: str) -> bool:
    """Whether ``name`` is a PEFT-wrapped name (``base_model.model.`` ...)."""
    return name.startswith(PEFT_PREFIX)


def _lora_part(source: str, parts: list[str]) -> PeftName | None:
    """A LoRA tensor: ``<module>.<part>.<adapter>[.<param>]``."""
    for i, p in enumerate(parts):
        if p not in LORA_PARTS or i == 0 or i + 1 >= len(parts):
            continue
        module, adapter, param = ".".join(parts[:i]), parts[i + 1], parts[i + 2:]
        if p in PARAM_DICT_PARTS:
            if param:
                continue
            saved = f"{module}.{p}"
        elif not param:
            continue
        elif p == "lora_magnitude_vector" and param == ["weight"]:
            saved = f"{module}.{p}"  # peft's LoRA model strips ".weight" (DoRA's old ParameterDict format)
        else:
            saved = ".".join([module, p, *param])
        return PeftName(source, "adapter", PEFT_PREFIX + saved, adapter, module, p)
    return None


def classify(name: str) -> PeftName:
    """Classify one wrapped name (see the module docstring).

    Raises:
        BadInputError: ``name`` is not a PEFT-wrapped name.
    """
    if not is_peft_name(name):
        raise BadInputError(f"{name}: not a PEFT name (no {PEFT_PREFIX!r} prefix)")
    rest = name[len(PEFT_PREFIX):]
    parts = rest.split(".")
    lora = _lora_part(name, parts)
    if lora is not None:
        return lora
    if "modules_to_save" in parts[1:-2]:
        i = parts.index("modules_to_save", 1)
        module = ".".join(parts[:i])
        saved = ".".join([module, *parts[i + 2:]])
        return PeftName(name, "adapter", PEFT_PREFIX + saved, parts[i + 1], module, "modules_to_save")
    if "original_module" in parts[1:-1]:
        i = parts.index("original_module", 1)
        return PeftName(name, "base", ".".join(parts[:i] + parts[i + 1:]), module=".".join(parts[:i]),
                        part="original_module")
    if "base_layer" in parts[1:-1]:
        i = parts.index("base_layer", 1)
        return PeftName(name, "base", ".".join(parts[:i] + parts[i + 1:]), module=".".join(parts[:i]), part="base_layer")
    return PeftName(name, "base", rest)


@dataclass(frozen=True)
class PeftSplit:
    """A wrapped state dict's names split into the base model and one adapter.

    Attributes:
        base: ``{source name: plain base-model name}``.
        adapter: ``{source name: name as PEFT saves it}``.
        adapter_name: the adapter's name in the source (``"default"``).
    """

    base: dict[str, str]
    adapter: dict[str, str]
    adapter_name: str


def split_names(names: Iterable[str]) -> PeftSplit:
    """Split every name of a PEFT-wrapped state dict (all must be wrapped).

    Raises:
        BadInputError: a name is not wrapped, the source holds several adapters, none, or two
            sources map to one output name.
    """
    items = [classify(n) for n in names]
    adapters = sorted({i.adapter for i in items if i.adapter is not None})
    if len(adapters) != 1:
        which = f"adapters {', '.join(adapters)}" if adapters else "no LoRA adapter tensors"
        raise BadInputError(f"the PEFT checkpoint holds {which}; the adapter layout writes exactly one adapter")
    base: dict[str, str] = {}
    adapter: dict[str, str] = {}
    for item in items:
        target = base if item.kind == "base" else adapter
        if item.name in target.values():
            other = next(k for k, v in target.items() if v == item.name)
            raise BadInputError(f"{item.source} and {other} both map to {item.name}; the checkpoint is not a PEFT "
                                "model state dict as peft writes it")
        target[item.source] = item.name
    return PeftSplit(base, adapter, adapters[0])


def propose_adapter_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, object]:
    """An ``adapter_config.json`` read off the adapter tensors (wrapped names), without ``lora_alpha``.

    ``r`` is the row count of ``lora_A`` (columns of ``lora_embedding_A``); if ranks differ by
    module the most common one (the larger on a tie) is ``r`` and the others go to ``rank_pattern``. ``target_modules``
    are the targeted modules' last name components.
    """
    ranks: dict[str, int] = {}
    targets: set[str] = set()
    dora = False
    for name, shape in shapes.items():
        item = classify(name)
        if item.kind != "adapter" or item.module is None:
            continue
        if item.part in LORA_PARTS:
            targets.add(item.module.rsplit(".", 1)[-1])
        dora |= item.part == "lora_magnitude_vector"
        if item.part == "lora_A" and len(shape) >= 2:
            ranks[item.module] = shape[0]
        elif item.part == "lora_embedding_A" and len(shape) == 2:
            ranks[item.module] = shape[0]
    if not ranks:
        raise BadInputError("the PEFT checkpoint has no lora_A / lora_embedding_A tensors to read a rank from")
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r = max(counts, key=lambda k: (counts[k], k))  # the most common rank; a tie goes to the larger
    config: dict[str, object] = {"peft_type": "LORA", "r": r, "target_modules": sorted(targets)}
    pattern = {m: v for m, v in sorted(ranks.items()) if v != r}
    if pattern:
        config["rank_pattern"] = pattern
    if dora:
        config["use_dora"] = True
    return config


def missing_adapter_config_message(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """The error text for a LoRA source without an adapter config: what was read, and what is missing."""
    proposal = propose_adapter_config(shapes)
    return ("the checkpoint holds a LoRA adapter but no adapter_config.json was given or found beside it; "
            f"read from the tensors: {json.dumps(proposal)}. lora_alpha (the scale the adapter was trained with) "
            "cannot be read from the weights: pass --adapter-config FILE, PEFT's adapter_config.json as the "
            "training run saved it, or write one with these values and the run's lora_alpha")


def check_adapter_config(config: Mapping[str, object], shapes: Mapping[str, tuple[int, ...]], origin: str) -> None:
    """Refuse an adapter config that does not describe the adapter tensors (rank, targets, alpha).

    Raises:
        BadInputError: one message listing every disagreement, naming ``origin``.
    """
    problems = []
    if "lora_alpha" not in config:
        problems.append("lora_alpha is missing")
    proposal = propose_adapter_config(shapes)
    raw_pattern, raw_proposed = config.get("rank_pattern"), proposal.get("rank_pattern")
    pattern: dict[str, Any] = raw_pattern if isinstance(raw_pattern, dict) else {}
    proposed_pattern: dict[str, Any] = raw_proposed if isinstance(raw_proposed, dict) else {}
    want = {**{m: proposal["r"] for m in _modules(shapes)}, **proposed_pattern}
    for module, rank in sorted(want.items()):
        given = next((v for k, v in pattern.items() if module == k or module.endswith("." + k)), config.get("r"))
        if given != rank:
            problems.append(f"{module}: r is {given} but lora_A has {rank} rows")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        raw_targets = proposal["target_modules"]
        for t in raw_targets if isinstance(raw_targets, list) else []:
            if t not in targets:
                problems.append(f"target_modules {targets} does not name {t!r}, which has LoRA tensors")
    if problems:
        raise BadInputError(f"{origin} does not describe the adapter in the checkpoint: {'; '.join(problems)}")


def _modules(shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    return sorted({c.module for c in map(classify, shapes) if c.part in ("lora_A", "lora_embedding_A") and c.module})
