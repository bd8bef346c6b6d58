"""Convert options: one keyword-only dataclass shared by the CLI, job files and the library.

Field names are the long flag names with dashes turned to underscores, which is also the
key a job file uses (``vocab_size = 50257``, ``workers = 8``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from shardfix.dtypes import CAST_CHOICES
from shardfix.errors import BadInputError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str | int, flag: str = "--max-shard-size") -> int:
    """Parse ``5GB``, ``500MB``, ``64KB``, ``1GiB`` or a plain byte count."""
    if isinstance(text, int):
        if text <= 0:
            raise BadInputError(f"{flag}: must be positive, got {text}")
        return text
    m = _SIZE.match(str(text))
    unit = (m.group(2) or "").upper() if m else ""
    if not m or unit not in _UNITS:
        raise BadInputError(f"{flag}: cannot read size {text!r}; use e.g. 5GB, 500MB or 64KB")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise BadInputError(f"{flag}: must be positive, got {text!r}")
    return value


EXECUTORS = ("auto", "ray", "inline")
DEVICES = ("cpu", "cuda")


@dataclass(kw_only=True, slots=True)
class ConvertOptions:
    """Everything ``shardfix convert`` can be told; validated on construction."""

    # reconcile
    vocab_size: int | None = None
    tokenizer: str | None = None
    target_config: str | None = None
    target_shapes: str | None = None
    target_model: str | None = None
    profile: str | None = None
    param_names: str | None = None
    trainable: str | None = None
    split_fused: bool = False
    key_map: str | None = None
    no_optimizer: bool = False
    allow_grow: bool = False
    grow_init: str = "mean"
    skip_mismatched: bool = False
    companions: str | None = None
    partial_optimizer: bool = False
    trust_pickle: bool = False
    # run
    executor: str = "auto"
    workers: int | None = None
    device: str = "cpu"
    ray_address: str | None = None
    max_shard_size: int | str = "5GB"
    dtype: str = "keep"
    resume: bool = False
    overwrite: bool = False
    verify: bool = True
    progress: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.max_shard_size = parse_size(self.max_shard_size)
        if self.executor not in EXECUTORS:
            raise BadInputError(f"--executor: {self.executor!r} is not one of {', '.join(EXECUTORS)}")
        if self.device not in DEVICES:
            raise BadInputError(f"--device: {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.dtype not in CAST_CHOICES:
            raise BadInputError(f"--dtype: {self.dtype!r} is not one of {', '.join(CAST_CHOICES)}")
        if self.workers is not None and self.workers < 1:
            raise BadInputError(f"--workers: must be at least 1, got {self.workers}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise BadInputError(f"--vocab-size: must be positive, got {self.vocab_size}")
        if self.grow_init not in ("mean", "zeros"):
            raise BadInputError(f"--grow-init: {self.grow_init!r} is not one of mean, zeros")
        if self.trainable is not None:
            try:
                re.compile(self.trainable)
            except re.error as e:
                raise BadInputError(f"--trainable: {self.trainable!r} is not a valid regex ({e})") from e
        if self.resume and self.overwrite:
            raise BadInputError("--resume and --overwrite contradict each other; pick one")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "extra"]
