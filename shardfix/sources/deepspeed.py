"""DeepSpeed ZeRO (stages 1, 2, 3) checkpoints: a root with ``latest`` or one ``global_stepN/`` directory.

The files (see docs/formats/deepspeed.md) are read with the allowlist unpickler of
:mod:`~shardfix.sources.deepspeed_pickle` -- DeepSpeed is never imported -- and every tensor
stays a file offset until :meth:`DeepSpeedSource.read_tensor` asks for it.

The index presents *logical* entries the planner already understands:

* ``("model", name)``: each trainable parameter's fp32 master, reassembled from every rank's
  flat optimizer partitions (as ``zero_to_fp32`` does), names/order/shapes from ``param_shapes``;
  frozen parameters from ``frozen_param_fragments``; buffers from the model-state file;
* ``("optim", "state", name, state)``: ``exp_avg``, ``exp_avg_sq`` (any flat per-group state)
  reassembled the same way, and ``step`` (the group's 0-d state);
* ``("optim", "param_groups", g, hparam)``: rank 0's hyperparameters, ``params`` as names;
* every other non-tensor value of every file as an :class:`ObjectEntry` keyed
  ``global_stepN/<file>:<dotted path>``.

Each logical tensor is a list of byte ranges of the partition files (:meth:`byte_ranges`), so
it is read or streamed one parameter at a time; no group is ever concatenated in memory.
:attr:`DeepSpeedSource.containers` lists every *physical* entry of every file with the logical
keys it feeds and the padding elements removed from it, so nothing in the files goes unaccounted.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from shardfix.dtypes import st_name
from shardfix.errors import BadInputError
from shardfix.io.preads import fill
from shardfix.io.regular import check_regular, open_regular
from shardfix.sources.base import ByteRange, ObjectEntry, PathPart, SourceIndex, StoredEntry, TensorEntry, join_key
from shardfix.sources.deepspeed_build import build_logical
from shardfix.sources.deepspeed_pickle import Inert, Stored, load_tree, plain
from shardfix.sources.fastrecord import byte_view

NAME = "deepspeed"
DESCRIBE = "a DeepSpeed ZeRO checkpoint (a directory holding `latest`, or its global_stepN/ directory)"
_OPTIM = re.compile(r"^(?P<prefix>(?:bf16_)?)zero_pp_rank_(?P<rank>\d+)_mp_rank_(?P<mp>\d+)_optim_states\.pt$")
_MODEL = re.compile(r"^(?:zero_pp_rank_(?P<rank>\d+)_)?mp_rank_(?P<mp>\d+)_model_states\.pt$")


def _is_step_dir(path: Path) -> bool:
    try:
        return path.is_dir() and any(_OPTIM.match(p.name) or _MODEL.match(p.name) for p in path.iterdir())
    except OSError:
        return False


def _latest(path: Path) -> Path | None:
    """The step directory ``path/latest`` names, or None when there is no ``latest`` file."""
    latest = path / "latest"
    if not latest.is_file():
        return None
    check_regular(latest)
    try:
        tag = latest.read_text(encoding="utf-8", errors="replace").strip()[:256]
    except OSError as e:
        raise BadInputError(f"{latest}: cannot read ({e.strerror})") from e
    if not tag or "/" in tag or tag in (".", ".."):
        raise BadInputError(f"{latest}: does not name a checkpoint tag ({tag!r}); pass the global_stepN/ directory")
    return path / tag


def detect(path: Path) -> bool:
    """A directory of DeepSpeed ``*_model_states.pt``/``*_optim_states.pt`` files, or a root whose
    ``latest`` names one."""
    if not path.is_dir():
        return False
    try:
        step = _latest(path)
    except BadInputError:
        return True  # ours; opening it says what is wrong
    return _is_step_dir(path) or (step is not None and (not step.exists() or _is_step_dir(step)))


def open(path: Path, trust_pickle: bool = False) -> DeepSpeedSource:  # noqa: A001 - registry verb
    return DeepSpeedSource(path)


@dataclass(slots=True)
class Container:
    """One physical entry of a DeepSpeed file and what became of it.

    Attributes:
        key: ``global_stepN/<file>:<dotted path>``.
        file: the file, relative to the checkpoint root.
        path: the entry's path inside the file.
        dtype, shape: for tensors (None for other values).
        feeds: the logical index keys built from it (an object's own key when it is in the index).
        padding: elements of the tensor that are alignment or partition padding, not read.
        note: why it feeds nothing, when it does not.
    """

    key: str
    file: str
    path: tuple[PathPart, ...]
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    feeds: list[str] = field(default_factory=list)
    padding: int = 0
    note: str = ""
    used: int = 0


@dataclass(slots=True)
class _Spec:
    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: list[tuple[Stored, int, int]]  # (tensor, element offset, elements)


class DeepSpeedSource:
    """A DeepSpeed ZeRO checkpoint, indexed from its pickles; tensors read by byte range."""

    format: ClassVar[str] = NAME

    def __init__(self, path: Path) -> None:
        self.path = path
        self.step_dir = _latest(path) or path
        if not self.step_dir.is_dir():
            raise BadInputError(f"{path / 'latest'} names {self.step_dir.name!r}, but {self.step_dir} does not exist; "
                                "the checkpoint is incomplete -- pass an existing global_stepN/ directory")
        self._root = self.step_dir.parent
        self._fds: dict[Path, int] = {}
        self._specs: dict[str, _Spec] = {}
        self.containers: list[Container] = []
        self._phys: dict[int, Container] = {}
        self._trees: dict[Path, Any] = {}
        optim, model = self._find_files()
        self.stage, self.world_size = self._stage(optim[0])
        entries: list[TensorEntry | ObjectEntry] = []
        self._walk_all(optim, model, entries)
        m0, o0 = self._trees[model[0]], [self._trees[p]["optimizer_state_dict"] for p in optim]
        self.model_files, self.optim_files = model, optim
        build_logical(self, m0, [self._trees[p] for p in model], o0, entries)
        for c in self.containers:
            if c.shape is not None and c.feeds:
                c.padding = max(0, _numel(c.shape) - c.used)
            elif c.shape is not None and not c.note:
                c.note = "only alignment padding" if c.shape and _numel(c.shape) else "an empty tensor"
        files = [*model, *optim]
        self.index = SourceIndex(path, NAME, files, sum(p.stat().st_size for p in files), entries,
                                 [f"DeepSpeed ZeRO-{self.stage}, world size {self.world_size}; model = fp32 masters "
                                  "from the optimizer partitions"])
        self.index.stored = [StoredEntry(c.key, c.dtype, c.shape, list(c.feeds), c.padding, c.note)
                             for c in self.containers if c.shape is not None and c.dtype is not None]

    # -- files -------------------------------------------------------------------------------

    def _find_files(self) -> tuple[list[Path], list[Path]]:
        optim: dict[int, Path] = {}
        prefixes, mps = set(), set()
        for p in sorted(self.step_dir.iterdir()):
            m = _OPTIM.match(p.name) or _MODEL.match(p.name)
            if not m:
                continue
            mps.add(m["mp"])
            if m.re is _OPTIM:
                prefixes.add(m["prefix"])
                optim[int(m["rank"])] = p
        if len(mps) > 1 or (mps and mps != {"00"}):
            raise BadInputError(f"{self.step_dir}: model-parallel ranks {sorted(mps)}; shardfix reads DeepSpeed "
                                "checkpoints without tensor/pipeline parallelism (mp_rank_00 only)")
        if len(prefixes) > 1:
            raise BadInputError(f"{self.step_dir}: optimizer files of two kinds ({sorted(prefixes)}); remove the stale ones")
        if 0 not in optim:
            raise BadInputError(
                f"{self.step_dir / 'zero_pp_rank_0_mp_rank_00_optim_states.pt'}: missing; DeepSpeed keeps the fp32 "
                "weights and the optimizer moments in the *_optim_states.pt files -- copy the whole global_stepN/ directory")
        prefix = prefixes.pop()
        stage, ws = self._stage(optim[0])
        names = [self.step_dir / f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(ws)]
        names += [self.step_dir / (f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" if stage == 3
                                   else "mp_rank_00_model_states.pt") for r in range(ws if stage == 3 else 1)]
        for p in names:
            if not p.is_file():
                raise BadInputError(f"{p}: missing; the checkpoint was saved by {ws} ranks (ZeRO-{stage}) and every "
                                    "rank's file is needed -- copy the whole global_stepN/ directory")
        extra = sorted(r for r in optim if r >= ws)
        if extra:
            raise BadInputError(f"{optim[extra[0]]}: a rank beyond the saved world size {ws}; the directory mixes saves")
        return names[:ws], names[ws:]

    def _stage(self, optim0: Path) -> tuple[int, int]:
        tree = self._tree(optim0)
        osd = tree.get("optimizer_state_dict") if isinstance(tree, dict) else None
        if not isinstance(osd, dict) or "zero_stage" not in osd or "partition_count" not in osd:
            raise BadInputError(f"{optim0}: no optimizer_state_dict with zero_stage and partition_count; not a ZeRO "
                                "optimizer file")
        stage, count = osd["zero_stage"], osd["partition_count"]
        ws = max(count) if isinstance(count, list) and count else count
        if type(stage) is not int or not 1 <= stage <= 3 or type(ws) is not int or ws < 1:
            raise BadInputError(f"{optim0}: zero_stage {stage!r} / partition_count {count!r} not understood")
        return stage, ws

    def _tree(self, path: Path) -> Any:
        if path not in self._trees:
            self._trees[path] = load_tree(path)
        return self._trees[path]

    # -- physical entries --------------------------------------------------------------------

    def _walk_all(self, optim: list[Path], model: list[Path], entries: list[TensorEntry | ObjectEntry]) -> None:
        for p in [*model, *optim]:
            rel = p.relative_to(self._root).as_posix()
            self._walk(self._tree(p), rel, (), entries, p in optim and p != optim[0])

    def _walk(self, obj: Any, rel: str, path: tuple[PathPart, ...], entries: list[TensorEntry | ObjectEntry],
              replica: bool) -> None:
        key = f"{rel}:{join_key(path)}"
        if isinstance(obj, Stored):
            c = Container(key, rel, path, st_name(obj.dtype), obj.shape)
            self._phys[id(obj)] = c
            self.containers.append(c)
            return
        nested = isinstance(obj, dict) or (isinstance(obj, (list, tuple)) and any(
            isinstance(v, (Stored, dict, list)) for v in obj))
        if nested and obj:
            items = obj.items() if isinstance(obj, dict) else enumerate(obj)
            for k, v in items:
                self._walk(v, rel, (*path, k if isinstance(k, (str, int)) else str(k)), entries, replica)
            return
        c = Container(key, rel, path)
        self.containers.append(c)
        if "param_groups" in path and "base_optimizer_state" in path or path[:3] == (
                "optimizer_state_dict", "optimizer_state_dict", "param_groups"):
            c.note = "a param-group value: rank 0's are the optim.param_groups entries" if not replica else \
                "a replica of rank 0's param-group value"
            return
        c.feeds.append(key)
        type_name = obj.class_name if isinstance(obj, Inert) else type(obj).__name__
        entries.append(ObjectEntry(key, (rel, *path), plain(obj), type_name))

    def feed(self, stored: Stored, logical: str, used: int) -> None:
        c = self._phys[id(stored)]
        if logical not in c.feeds:
            c.feeds.append(logical)
        c.used += used

    def note(self, stored: Stored, why: str) -> None:
        self._phys[id(stored)].note = why

    def add(self, path: tuple[PathPart, ...], dtype: torch.dtype, shape: tuple[int, ...],
            pieces: list[tuple[Stored, int, int]], entries: list[TensorEntry | ObjectEntry]) -> None:
        """Add one logical tensor built from ``pieces`` (each a run of one stored flat tensor)."""
        key = join_key(path)
        want = _numel(shape)
        got = sum(n for _, _, n in pieces)
        if got != want or any(s.dtype != dtype for s, _, _ in pieces):
            raise BadInputError(f"{self.step_dir}: {key} assembles {got} elements of {want} (or mixed dtypes); the "
                                "files do not belong to one save")
        for s, start, n in pieces:
            if not s.is_flat() or start + n > s.numel:
                raise BadInputError(f"{s.file}: a partition feeding {key} is not a plain flat tensor")
            self.feed(s, key, n)
        self._specs[key] = _Spec(dtype, shape, pieces)
        entries.append(TensorEntry(key, path, st_name(dtype), shape))

    # -- reading -----------------------------------------------------------------------------

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = open_regular(path)
        return fd

    def byte_ranges(self, key: str) -> list[ByteRange] | None:
        """The logical tensor's row-major bytes: one run per piece, in order."""
        spec = self._spec(key)
        item = spec.dtype.itemsize
        return [ByteRange(self._fd(s.file), s.start + start * item, n * item, s.file) for s, start, n in spec.pieces
                if n]

    def read_tensor(self, key: str) -> torch.Tensor:
        """Assemble one logical tensor from its pieces, reading each by byte range."""
        spec = self._spec(key)
        out = torch.empty(_numel(spec.shape), dtype=spec.dtype)
        view, pos = byte_view(out), 0
        for r in self.byte_ranges(key) or []:
            fill(r.fd, r.offset, view[pos : pos + r.nbytes], r.origin, key)
            pos += r.nbytes
        return out.reshape(spec.shape)

    def _spec(self, key: str) -> _Spec:
        spec = self._specs.get(key)
        if spec is None:
            raise BadInputError(f"{self.path}: no tensor {key!r}")
        return spec

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
