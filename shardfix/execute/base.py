"""The executor contract: run a list of output files through :func:`~shardfix.execute.task.write_file_task`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from shardfix.execute.context import TaskContext
from shardfix.execute.progress import Progress
from shardfix.plan import OutputFile


@dataclass(slots=True)
class RunRequest:
    """What an executor is asked to do: the files, the context, and the run's knobs."""

    ctx: TaskContext
    files: list[OutputFile]
    progress: Progress
    workers: int | None = None
    address: str | None = None
    #: facts the executor reports back for the report's ``executor`` section
    info: dict[str, Any] = field(default_factory=dict)


class Executor(Protocol):
    """Runs every file of a request and returns each task's result dict (any order)."""

    name: str

    def run(self, request: RunRequest) -> list[dict[str, Any]]: ...
