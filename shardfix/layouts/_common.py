"""Helpers the layout modules share: listing the files a layout leaves alone, reading small facts."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from shardfix.io.regular import is_regular

#: Files a layout never converts, by name pattern, with the reason shown in the report.
KNOWN_REASONS: tuple[tuple[str, str], ...] = (
    (r"^random_states_\d+\.pkl$", "RNG states (a pickle; not read: unpickling runs code)"),
    (r"^rng_state(_\d+)?\.pth$", "RNG states (not model or optimizer state)"),
    (r"^scheduler(_\d+)?\.(pt|bin)$", "learning-rate scheduler state (not model or optimizer state)"),
    (r"^sampler(_\d+)?\.bin$", "data sampler state (not model or optimizer state)"),
    (r"^dl_state_dict(_\d+)?\.bin$", "dataloader state (not model or optimizer state)"),
    (r"^scaler\.pt$", "gradient-scaler state (not model or optimizer state)"),
    (r"^custom_checkpoint_\d+\.pkl$", "user objects registered with accelerate (a pickle; not read)"),
    (r"^trainer_state\.json$", "trainer progress (step and epoch are reported in findings.metadata)"),
    (r"^training_args\.bin$", "TrainingArguments (a pickle of a transformers class; not read: unpickling runs code)"),
    (r"^meta\.pt$", "Lightning loop and callback state (step and epoch are reported in findings.metadata)"),
    (r"^(generation_)?config\.json$", "model configuration: copy it into the output directory to load it with "
                                      "from_pretrained"),
    (r"^(tokenizer.*|special_tokens_map|vocab|merges|added_tokens)\.(json|txt|model)$", "tokenizer file (no tensors)"),
    (r"^model\.safetensors\.index\.json$", "index of the model shards (the shards themselves are read)"),
    (r"^(README\.md|\.gitattributes)$", "documentation"),
)


def reason_for(name: str) -> str:
    for pattern, reason in KNOWN_REASONS:
        if re.match(pattern, name):
            return reason
    return "not a file this layout reads"


def not_converted(root: Path, claimed: set[str]) -> list[dict[str, str]]:
    """Every top-level entry of ``root`` not in ``claimed`` (relative names), with its reason."""
    out = []
    for p in sorted(root.iterdir()):
        if p.name in claimed or p.name.startswith(".shardfix"):
            continue
        out.append({"file": p.name + ("/" if p.is_dir() else ""), "reason": reason_for(p.name)})
    return out


def json_facts(path: Path, fields: tuple[str, ...]) -> dict[str, Any]:
    """The named scalar fields of a JSON object file (missing or unreadable: none)."""
    if not is_regular(path):
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {f: data[f] for f in fields if isinstance(data.get(f), (int, float, str, bool))}


def torch_facts(path: Path, fields: tuple[str, ...]) -> tuple[dict[str, Any], str | None]:
    """The named scalar fields of a small torch.save dict, read with ``weights_only=True``.

    Returns:
        The facts, and a note when the file could not be read safely (its facts are then absent).
    """
    if not is_regular(path):
        return {}, f"{path.name}: not a regular file; not read"
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses arbitrary objects (e.g. hparams holding a class)
        return {}, f"{path.name}: not read ({type(e).__name__}); its step and epoch are not reported"
    if not isinstance(data, dict):
        return {}, None
    return {f: data[f] for f in fields if isinstance(data.get(f), (int, float, str, bool))}, None
