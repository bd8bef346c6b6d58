"""Hugging Face accelerate ``Accelerator.save_state(dir)``.

With FSDP ``SHARDED_STATE_DICT``: ``pytorch_model_fsdp_0/`` (DCP ``{"model": ...}``) and
``optimizer_0/`` (DCP ``{"optimizer": ...}``, keyed by FQN) side by side. With DDP or one
process: ``model.safetensors`` (or ``pytorch_model.bin``) and ``optimizer.bin`` (a torch
``optimizer.state_dict()`` with integer ids). Both also hold ``random_states_<rank>.pkl`` and,
when registered, ``scheduler.bin`` / ``sampler.bin`` -- listed as not converted.
"""

from __future__ import annotations

from pathlib import Path

from shardfix.errors import BadInputError
from shardfix.layouts._common import not_converted
from shardfix.layouts._parts import MODEL_DCP, has_model, model_parts, optimizer_parts
from shardfix.sources.composite import CompositeSource

NAME = "accelerate"
DESCRIBE = "an accelerate save_state directory (pytorch_model_fsdp_0/ + optimizer_0/, or model.safetensors + optimizer.bin)"


def detect(path: Path) -> bool:
    """accelerate's model (DCP dir or file) next to its RNG pickle or an optimizer it names."""
    if not path.is_dir():
        return False
    if (path / MODEL_DCP).is_dir():
        return True
    return has_model(path) and ((path / "random_states_0.pkl").is_file() or (path / "optimizer.bin").is_file())


def open(path: Path, trust_pickle: bool = False) -> CompositeSource:  # noqa: A001 - registry verb
    parts = model_parts(path, trust_pickle) + optimizer_parts(path, trust_pickle)
    if not parts:
        raise BadInputError(f"{path}: an accelerate directory without a model or optimizer (found: "
                            f"{', '.join(sorted(p.name for p in path.iterdir()))})")
    claimed = {p.label for p in parts}
    return CompositeSource(path, NAME, parts, not_converted=not_converted(path, claimed))
