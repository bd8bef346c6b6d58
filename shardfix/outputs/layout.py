"""The output-layout contract: what a layout decides, and the directory names every layout shares.

A layout decides the names of the data files of each *set* of tensors (model, optimizer,
companions), the index files that map tensor names to files, and the *sidecar* files written
next to them (optimizer param groups today; configs, tokenizer files and adapter configs next).
Layouts deal in names and small JSON documents only: the plan gives them counts and weight maps,
the executor calls :meth:`OutputLayout.finish` once every data file is in place, and ``verify``
and ``load_optimizer_state`` ask the same layout where things are. Nothing here imports the planner
or the executor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

#: The report, written last: its presence with ``"status": "complete"`` is what "finished" means.
REPORT_NAME = "shardfix-report.json"
#: Finished data files wait here until every file of the run is done.
STAGING = ".shardfix-staging"

MODEL = "model"
OPTIMIZER = "optimizer"
COMPANIONS = "companions"
#: a PEFT adapter's tensors, under PEFT's saved names (``adapter/adapter_model.safetensors``)
ADAPTER = "adapter"
SETS = (MODEL, OPTIMIZER, COMPANIONS, ADAPTER)
#: safetensors metadata key of optimizer files: JSON ``{tensor name: row range}`` for partial slices.
PARTIAL_ROWS_KEY = "shardfix.partial_rows"


@dataclass(frozen=True, slots=True)
class SetFiles:
    """One set's data files as the executor finished them: ``weight_map`` tensor -> file, and bytes."""

    set: str
    files: Sequence[str]
    weight_map: Mapping[str, str]
    total_size: int


@dataclass(slots=True)
class Sidecar:
    """A small file next to the data files: a JSON document (``content``) or a copy of a file (``copy_from``).

    ``name`` is relative to the output directory (``config.json``, ``adapter/adapter_config.json``).
    ``extra`` goes into the report's entry (``from``, ``changes`` ...). ``bytes`` and ``checksum``
    (xxh3-128) are set when the sidecar is staged (:mod:`shardfix.outputs.sidecars`).
    """

    name: str
    content: dict[str, Any] | None
    what: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    copy_from: str | None = None
    bytes: int | None = None
    checksum: str | None = None

    def record(self) -> dict[str, Any]:
        """The report's entry for this sidecar."""
        out: dict[str, Any] = {"name": self.name, "what": self.what, "bytes": self.bytes, "checksum": self.checksum}
        if self.copy_from is not None:
            out["copied_from"] = self.copy_from
        return {**out, **self.extra}


class OutputLayout(Protocol):
    """An output directory's shape. Register an implementation in :data:`shardfix.outputs.LAYOUTS`."""

    name: str

    def file_names(self, set_name: str, count: int) -> list[str]:
        """Names of the ``count`` data files of ``set_name``, in order."""
        ...

    def index_name(self, set_name: str) -> str:
        """The index file of a set written in several files."""
        ...

    def sidecar_names(self) -> tuple[str, ...]:
        """Every sidecar file this layout may write (verify checks them; overwrite knows them)."""
        ...

    def finish(self, out: Path, sets: list[SetFiles], sidecars: list[Sidecar]) -> list[str]:
        """Write index files into ``out`` and place the staged sidecars (data files are already there);
        return their names."""
        ...
