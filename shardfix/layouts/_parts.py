"""Finding the model and optimizer files of a training stack's directory, by the names the stacks use.

Model: ``pytorch_model_fsdp_0/`` (DCP ``{"model": ...}``), ``model.safetensors`` or
``model-0000i-of-0000n.safetensors``, ``pytorch_model.bin`` (or its shards), or
``pytorch_model_fsdp_0.bin``. Optimizer ``i``: ``optimizer_i/`` (DCP ``{"optimizer": ...}``,
keyed by FQN), ``optimizer.bin`` / ``optimizer_i.bin`` (accelerate) or ``optimizer.pt`` (the
Trainer): a torch ``optimizer.state_dict()`` with integer ids. Each becomes a
:class:`~shardfix.sources.composite.Part` labelled by its file name, its paths put under
``("model", ...)`` or ``("optimizers", i, ...)``.
"""

from __future__ import annotations

import re
from pathlib import Path

from shardfix.sources import dcp, safetensors_src, torchsave
from shardfix.sources.composite import Part, keep, replace_head, under

MODEL_DCP = "pytorch_model_fsdp_0"
_MODEL_FILE = re.compile(
    r"^(model(-\d{5}-of-\d{5})?\.safetensors|pytorch_model(-\d{5}-of-\d{5})?\.bin|pytorch_model_fsdp_0\.bin)$"
)
_OPTIM_FILE = re.compile(r"^optimizer(?:_(\d+))?\.(bin|pt)$")
_OPTIM_DCP = re.compile(r"^optimizer_(\d+)$")


def model_parts(root: Path, trust_pickle: bool) -> list[Part]:
    """The model's files or DCP directory in ``root`` (empty when there are none)."""
    if dcp.detect(root / MODEL_DCP):
        return [Part(MODEL_DCP, dcp.open(root / MODEL_DCP, trust_pickle=trust_pickle), keep)]
    parts = []
    for p in sorted(root.iterdir()):
        if not (p.is_file() and _MODEL_FILE.match(p.name)):
            continue
        src = safetensors_src.open(p) if p.suffix == ".safetensors" else torchsave.open(p, trust_pickle=trust_pickle)
        parts.append(Part(p.name, src, under("model")))
    return parts


def optimizer_parts(root: Path, trust_pickle: bool) -> list[Part]:
    """Every optimizer's state in ``root``, as ``("optimizers", i, ...)`` paths."""
    parts = []
    for p in sorted(root.iterdir()):
        if p.is_dir() and (m := _OPTIM_DCP.match(p.name)) and dcp.detect(p):
            # DCP {"optimizer": {"state": {fqn: ...}, "param_groups": [...]}}
            parts.append(Part(p.name, dcp.open(p, trust_pickle=trust_pickle), replace_head(("optimizers", int(m.group(1))))))
        elif p.is_file() and (m := _OPTIM_FILE.match(p.name)):
            # a plain optimizer.state_dict(): {"state": {id: ...}, "param_groups": [...]}
            parts.append(Part(p.name, torchsave.open(p, trust_pickle=trust_pickle), under("optimizers", int(m.group(1) or 0))))
    return parts


def has_model(root: Path) -> bool:
    """Pure name check: ``root`` holds a model file or a model DCP directory."""
    try:
        return (root / MODEL_DCP).is_dir() or any(_MODEL_FILE.match(p.name) for p in root.iterdir())
    except OSError:
        return False
