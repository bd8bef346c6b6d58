"""transformers ``Trainer`` checkpoints: ``checkpoint-N/``.

``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + index, or an FSDP run's
``pytorch_model_fsdp_0/``), ``optimizer.pt`` (AdamW state with integer ids: the weight-decay
group, then the no-decay group), ``scheduler.pt``, ``rng_state*.pth``, ``trainer_state.json``
(``global_step`` and ``epoch`` are reported), ``training_args.bin`` and ``config.json``.
"""

from __future__ import annotations

from pathlib import Path

from shardfix.errors import BadInputError
from shardfix.layouts._common import json_facts, not_converted
from shardfix.layouts._parts import has_model, model_parts, optimizer_parts
from shardfix.sources.composite import CompositeSource, Facts

NAME = "trainer"
DESCRIBE = "a transformers Trainer checkpoint-N/ directory (trainer_state.json, model, optimizer.pt)"
STATE = "trainer_state.json"
FACTS = ("global_step", "epoch", "max_steps", "num_train_epochs")


def detect(path: Path) -> bool:
    """``trainer_state.json`` next to a model file."""
    return path.is_dir() and (path / STATE).is_file() and has_model(path)


def open(path: Path, trust_pickle: bool = False) -> CompositeSource:  # noqa: A001 - registry verb
    parts = model_parts(path, trust_pickle) + optimizer_parts(path, trust_pickle)
    if not parts:
        raise BadInputError(f"{path}: a Trainer checkpoint without model files (found: "
                            f"{', '.join(sorted(p.name for p in path.iterdir()))}); copy the whole checkpoint-N directory")
    facts = [Facts(STATE, json_facts(path / STATE, FACTS))]
    claimed = {p.label for p in parts}
    return CompositeSource(path, NAME, parts, facts=facts, not_converted=not_converted(path, claimed))
