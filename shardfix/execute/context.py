"""What a task is told: the typed context every executor hands to :func:`~shardfix.execute.task.write_file_task`.

A :class:`TaskContext` is small and picklable (Ray ships it to workers). Fault injection for tests
travels in it too (:class:`Faults`), so production code reads no test variables from the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

VerifyMode = Literal["xxh3", "digest"]


@dataclass(frozen=True, slots=True)
class Faults:
    """Test-only fault injection, set by the caller of :func:`shardfix.api.convert` (never from the environment).

    Attributes:
        pid_dir: each task writes ``NAME.pid`` there with its process id (so a test can kill it).
        delay: seconds a task pauses after its first tensor (so a test can interrupt it mid-write).
        fail_once_dir: the first attempt at each file fails with an I/O error (EIO); a marker file in
            this directory remembers the attempt across processes.
    """

    pid_dir: str | None = None
    delay: float = 0.0
    fail_once_dir: str | None = None


@dataclass(frozen=True, slots=True)
class CompanionsRef:
    """A second input (``--companions``): where it is and how to open it."""

    path: str
    format: str


@dataclass(frozen=True, slots=True)
class TaskContext:
    """Everything a task needs besides its files.

    Attributes:
        source: absolute path of the checkpoint; ``format`` its source format name.
        trust_pickle: torch.save files may be fully unpickled (``--trust-pickle``).
        staging: absolute path of ``OUT/.shardfix-staging``.
        device: ``cpu`` or ``cuda``: where tensors are transformed (and digested, on cuda).
        verify: re-read each written file; ``verify_mode`` ``xxh3`` hashes the file on the host,
            ``digest`` compares per-tensor digests on the device (default on cuda).
        threads: torch threads a task may use.
    """

    source: str
    format: str
    staging: str
    trust_pickle: bool = False
    device: str = "cpu"
    verify: bool = True
    verify_mode: VerifyMode | None = None
    companions: CompanionsRef | None = None
    threads: int = 1
    faults: Faults | None = None

    def with_threads(self, threads: int) -> TaskContext:
        return replace(self, threads=threads)

    @property
    def effective_verify_mode(self) -> VerifyMode:
        return self.verify_mode or ("digest" if self.device.startswith("cuda") else "xxh3")
