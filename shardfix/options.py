"""Convert options: the one definition of every ``convert`` option, shared by the CLI, job files and the library.

Each field of :class:`ConvertOptions` carries its own spec (``dataclasses.field`` metadata built by
:func:`_opt`): command-line flag, value kind, choices, help text, group (``reconcile`` or ``run``),
whether ``shardfix plan`` takes it too, and whether a job file's value is a path to resolve against
the job file's directory. :data:`OPTIONS` lists those specs; ``shardfix.cli`` generates the argparse
flags from it and ``shardfix.jobs`` validates job-file keys with it. Nothing else describes options.

Field names are the long flag names with dashes turned to underscores, which is also the key a job
file uses (``vocab_size = 50257``, ``workers = 8``). This module imports only ``errors`` and ``dtypes``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from shardfix.dtypes import CAST_CHOICES
from shardfix.errors import BadInputError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str | int, flag: str = "--max-shard-size") -> int:
    """Parse ``5GB``, ``500MB``, ``64KB``, ``1GiB`` or a plain byte count.

    Args:
        text: the size as written, or a byte count.
        flag: the flag or key named in the error message.

    Returns:
        The size in bytes.

    Raises:
        BadInputError: the size is unreadable or not positive.
    """
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
GROW_INITS = ("mean", "zeros")
#: Largest --vocab-size accepted (no tokenizer comes near; a larger number is a typo).
MAX_VOCAB = 1 << 31
DTYPES = tuple(CAST_CHOICES)

Group = Literal["reconcile", "run"]
#: ``int``/``str``/``bool`` as named; ``size`` is a byte count or a string such as ``"5GB"``.
Kind = Literal["int", "str", "bool", "size"]

_TOML_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "str": (str,), "bool": (bool,), "size": (int, str)}
_TYPE_NAMES = {"int": "an integer", "str": "a string", "bool": "true/false", "size": "an integer or a string"}
_META = "shardfix.option"


@dataclass(frozen=True, slots=True)
class Option:
    """How one ``ConvertOptions`` field appears on the command line and in job files.

    Attributes:
        name: the field name, which is also the job-file key.
        kind: the value kind (see :data:`Kind`).
        group: the ``--help`` group of ``convert``.
        default: the field's default.
        help: the flag's help text (``None``: none).
        choices: the allowed values, if restricted.
        flag: the long flag.
        sets: for a ``bool`` option, the value its flag stores (``--no-verify`` stores ``False``).
        off_flag: for a ``bool`` option, a second flag storing the opposite value (``--no-progress``).
        off_help: help text of ``off_flag``.
        path: a job file's value is a path, resolved against the job file's directory.
        plan: ``shardfix plan`` takes this flag too.
    """

    name: str
    kind: Kind
    group: Group
    default: Any
    help: str | None
    choices: tuple[str, ...] | None
    flag: str
    sets: bool
    off_flag: str | None
    off_help: str | None
    path: bool
    plan: bool

    @property
    def toml_types(self) -> tuple[type, ...]:
        """The TOML value types a job file may give (``bool`` is never taken for ``int``)."""
        return _TOML_TYPES[self.kind]

    @property
    def type_name(self) -> str:
        """What the value must be, for error messages: ``an integer``, ``true/false`` ..."""
        return _TYPE_NAMES[self.kind]

    def accepts(self, value: Any) -> bool:
        """Whether a job-file value has the right TOML type for this option."""
        if isinstance(value, bool):
            return self.kind == "bool"
        return isinstance(value, self.toml_types)


def _opt(default: Any, group: Group, kind: Kind, help: str | None = None, *, choices: tuple[str, ...] | None = None,
         flag: str | None = None, sets: bool = True, off_flag: str | None = None, off_help: str | None = None,
         path: bool = False, plan: bool = False) -> Any:
    """A dataclass field carrying its option spec (the field name and default complete it)."""
    spec = {"kind": kind, "group": group, "help": help, "choices": choices, "flag": flag, "sets": sets,
            "off_flag": off_flag, "off_help": off_help, "path": path, "plan": plan}
    return field(default=default, metadata={_META: spec})


@dataclass(kw_only=True, slots=True)
class ConvertOptions:
    """Everything ``shardfix convert`` can be told; validated on construction."""

    # reconcile
    vocab_size: int | None = _opt(None, "reconcile", "int", "true vocab size: trim padded vocab rows to it")
    tokenizer: str | None = _opt(None, "reconcile", "str", "tokenizer directory (or its tokenizer.json / SentencePiece "
                                 ".model): gives the vocab size; its tokenizer files are copied into OUT", path=True)
    target_config: str | None = _opt(None, "reconcile", "str", "Hugging Face config.json of the target model (default: "
                                     "one in or beside the source); written to OUT with the reconciled vocab_size",
                                     path=True)
    adapter_config: str | None = _opt(None, "reconcile", "str", "PEFT adapter_config.json of a LoRA checkpoint (default: "
                                      "one beside the source); copied to OUT/adapter/", path=True)
    target_shapes: str | None = _opt(None, "reconcile", "str",
                                     'JSON {"name": [dims]} of target shapes (names after prefix stripping)', path=True)
    target_model: str | None = _opt(None, "reconcile", "str", "module:callable building the target model (on the meta device)")
    profile: str | None = _opt(None, "reconcile", "str", "checkpoint profile (default: detected)")
    param_names: str | None = _opt(None, "reconcile", "str",
                                   "file listing the optimizer's parameter names in param-group order", path=True)
    trainable: str | None = _opt(None, "reconcile", "str", "regex selecting the trainable parameters the optimizer covers")
    split_fused: bool = _opt(False, "reconcile", "bool", "split fused weights (qkv_w, qkvo_w, banks)")
    key_map: str | None = _opt(None, "reconcile", "str", "TOML table of output names for --split-fused", path=True)
    no_optimizer: bool = _opt(False, "reconcile", "bool", "write no optimizer state")
    allow_grow: bool = _opt(False, "reconcile", "bool", "allow growing a vocab dim to a larger target")
    grow_init: str = _opt("mean", "reconcile", "str", "new rows for --allow-grow", choices=GROW_INITS)
    skip_mismatched: bool = _opt(False, "reconcile", "bool", "drop unreconcilable tensors instead of failing")
    companions: str | None = _opt(None, "reconcile", "str",
                                  "torch.save dict of side tensors keyed by parameter name (masks, EMA)", path=True)
    partial_optimizer: bool = _opt(False, "reconcile", "bool", "write partial (one rank's) optimizer slices under explicit names")
    trust_pickle: bool = _opt(False, "reconcile", "bool",
                              "allow full unpickling of torch.save files you trust (runs code in the file)")
    follow_symlinks: bool = _opt(False, "reconcile", "bool",
                                 "read files that symlinks inside the checkpoint point to outside it (listed in the report)")
    # run
    executor: str = _opt("auto", "run", "str", choices=EXECUTORS)
    workers: int | None = _opt(None, "run", "int", "parallel tasks (default: CPUs)")
    device: str = _opt("cpu", "run", "str", choices=DEVICES)
    ray_address: str | None = _opt(None, "run", "str", "join this Ray cluster instead of starting a local instance")
    max_shard_size: int | str = _opt("5GB", "run", "size", "largest output file, e.g. 5GB, 500MB, 64KB", plan=True)
    dtype: str = _opt("keep", "run", "str", "cast floating model tensors (optimizer state keeps its dtype)",
                      choices=DTYPES, plan=True)
    resume: bool = _opt(False, "run", "bool", "finish an interrupted conversion into OUT")
    overwrite: bool = _opt(False, "run", "bool", "replace an existing shardfix output in OUT (only files its manifest "
                           "proves shardfix wrote)")
    keep_foreign: bool = _opt(False, "run", "bool", "leave files in OUT that shardfix did not write untouched and write "
                              "beside them (one with the name of an output is still refused)")
    strict: bool = _opt(False, "run", "bool", "treat every warning as an error: exit 3 after writing a report saying "
                        "why", plan=True)
    verify: bool = _opt(True, "run", "bool", "skip re-reading each written file", flag="--no-verify", sets=False)
    progress: bool | None = _opt(None, "run", "bool", "force a progress bar", off_flag="--no-progress",
                                 off_help="no progress bar")
    #: Library-only settings; not an option (no flag, no job-file key, not in the report).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.max_shard_size = parse_size(self.max_shard_size)
        for o in OPTIONS:
            value = getattr(self, o.name)
            if o.choices is not None and value not in o.choices:
                raise BadInputError(f"{o.flag}: {value!r} is not one of {', '.join(o.choices)}")
        if self.workers is not None and self.workers < 1:
            raise BadInputError(f"--workers: must be at least 1, got {self.workers}")
        if self.vocab_size is not None and not 1 <= self.vocab_size <= MAX_VOCAB:
            raise BadInputError(f"--vocab-size: must be between 1 and {MAX_VOCAB:,}, got {self.vocab_size}")
        if self.trainable is not None:
            try:
                re.compile(self.trainable)
            except re.error as e:
                raise BadInputError(f"--trainable: {self.trainable!r} is not a valid regex ({e})") from e
        if self.resume and self.overwrite:
            raise BadInputError("--resume and --overwrite contradict each other; pick one")

    def to_dict(self) -> dict[str, Any]:
        """Every option's value (``extra`` left out), as recorded in the report."""
        d = asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def field_names(cls) -> list[str]:
        """The option names: every field but ``extra``."""
        return [o.name for o in OPTIONS]


def _build_options() -> tuple[Option, ...]:
    out = []
    for f in fields(ConvertOptions):
        if _META not in f.metadata:
            continue
        spec = dict(f.metadata[_META])
        spec["flag"] = spec["flag"] or "--" + f.name.replace("_", "-")
        out.append(Option(name=f.name, default=f.default, **spec))
    return tuple(out)


#: Every option, in field order (the order of ``--help``).
OPTIONS: tuple[Option, ...] = _build_options()
#: The options by name (field name = job-file key).
OPTION_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
