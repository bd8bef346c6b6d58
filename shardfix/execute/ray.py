"""Ray executor: one task per output file (or byte-budgeted group of small files).

Tasks receive the source path and their part of the plan (small dicts), write their own output
files (temporary name, fsync, rename into ``OUT/.shardfix-staging/``) and return checksums and
timings; no tensor ever goes through the object store. At most ``--workers`` tasks (default:
what the cluster can run at once) are in flight.

Failures:

* a worker process that dies (crash, ``kill -9``, node loss) -> Ray reruns the task, up to
  :data:`MAX_RETRIES` times;
* an I/O error inside a task (``OSError``, or a shardfix read/write error caused by one) ->
  the task is rerun up to :data:`MAX_RETRIES` times (NFS hiccups, a node's full scratch disk);
* a task killed by Ray's out-of-memory monitor -> rerun at most :data:`OOM_RETRIES` times, then
  the run fails with a message saying to lower ``--workers``; each task also asks Ray for the
  memory it will need, so the scheduler does not pack too many large tasks onto one node.

Files a task already staged (with a matching ``.done.json`` sidecar) are not rewritten when
the task is retried, so a group survives a kill without redoing finished files.

Without an address a local instance is started quietly (no dashboard, a short temp dir of our
own that is removed afterwards, loopback only, auth mode set explicitly) and shut down after
the run; with ``--ray-address`` or ``RAY_ADDRESS`` (which a Ray job sets) the run joins that
cluster. Outside a Ray job the driver ships the ``shardfix`` package to the cluster
(``runtime_env.py_modules``), so the workers run the driver's code; ``SHARDFIX_SHIP_CODE=0``
turns that off when shardfix is installed on every node.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shardfix.errors import BadInputError, InternalError, ShardfixError
from shardfix.execute.base import RunRequest
from shardfix.execute.choose import usable_cpus
from shardfix.execute.context import TaskContext
from shardfix.execute.task import write_file_task
from shardfix.plan import OutputFile, pack_in_order

log = logging.getLogger(__name__)

#: Reruns of a task whose worker died or that hit an I/O error.
MAX_RETRIES = 3
#: Reruns of a task killed by Ray's out-of-memory monitor (``RAY_task_oom_retries`` for the driver).
OOM_RETRIES = 1
#: Upper bound of the bytes one task writes when small files are grouped (``SHARDFIX_TASK_BYTES``).
TASK_BYTES = 1 << 30
#: Extra memory a task asks for on top of its largest tensors (interpreter, torch, buffers).
TASK_BASE_MEMORY = 256 << 20


class RetryableIOError(ShardfixError):
    """An I/O failure inside a task; Ray reruns the task (``retry_exceptions``)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self):  # keep the exit code across pickling
        return (type(self), (str(self), self.exit_code))


def local_ray_env() -> dict[str, str]:
    """Environment for a quiet, loopback-only local Ray instance (auth mode always explicit)."""
    return {
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEDUP_LOGS": "0",
    }


def resolve_address(address: str | None) -> str | None:
    """``--ray-address``, else ``RAY_ADDRESS`` (set inside Ray jobs and by ``scripts/slurm``)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def in_ray_job() -> bool:
    """True when this process is the entrypoint of a submitted Ray job."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def ship_code_runtime_env() -> dict[str, Any] | None:
    """``runtime_env`` that makes the driver's shardfix importable on the cluster's workers."""
    if in_ray_job() or os.environ.get("SHARDFIX_SHIP_CODE", "1") == "0":
        return None
    return {"py_modules": [str(Path(__file__).resolve().parent)]}


@contextlib.contextmanager
def _neutral_cwd(where: str) -> Iterator[None]:
    """Run ``ray.init`` from the empty directory ``where``.

    Ray puts the driver's working directory on every worker's import path (``py_driver_sys_path``);
    converting from inside a checkpoint directory holding, say, ``zstandard.py`` would make the
    workers run it. From here the workers get only this empty directory; shardfix itself comes from
    the installed package (or ``py_modules`` on a cluster), never from the working directory.
    """
    os.makedirs(where, mode=0o700, exist_ok=True)
    before = os.getcwd()
    os.chdir(where)
    try:
        yield
    finally:
        os.chdir(before)


#: Seconds a first connection to a Ray cluster may take (``SHARDFIX_RAY_CONNECT_TIMEOUT``): Ray retries
#: without end when the cluster refuses a missing or wrong token, so the probe runs in a child it can stop.
CONNECT_TIMEOUT_S = 60.0
_PROBE = "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); ray.shutdown()"
_TOKEN_HINT = ("; if the cluster uses token authentication, export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
               "(or RAY_AUTH_TOKEN_PATH) with the cluster's token")


def probe_cluster(address: str) -> None:
    """Check that the cluster at ``address`` lets us in, then join it (the run reuses the connection).

    The first attempt runs in a child process from an empty directory, stopped after
    :data:`CONNECT_TIMEOUT_S`: a refused or unreachable cluster is exit 2 naming the cause, never a hang.
    """
    timeout = float(os.environ.get("SHARDFIX_RAY_CONNECT_TIMEOUT") or CONNECT_TIMEOUT_S)
    with tempfile.TemporaryDirectory(prefix="sfxprobe-") as cwd:
        try:
            p = subprocess.run([sys.executable, "-c", _PROBE, address], cwd=cwd, capture_output=True, text=True,
                               timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise BadInputError(f"--ray-address {address}: no answer from the Ray cluster within {timeout:.0f} s; check "
                                f"the address{_TOKEN_HINT} (Ray keeps retrying when it refuses the token)") from None
    if p.returncode != 0:
        lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        cause = lines[-1][:300] if lines else f"exit {p.returncode}"
        auth = any(w in p.stderr.lower() for w in ("auth", "token", "unauthenticated"))
        raise BadInputError(f"--ray-address {address}: cannot connect to the Ray cluster ({cause})"
                            + (_TOKEN_HINT if auth else ""))
    RayRuntime(address, None, "cpu")


class RayRuntime:
    """A connection to Ray for one run: joined or started, and torn down afterwards."""

    def __init__(self, address: str | None, workers: int | None, device: str) -> None:
        self.address = address
        self.started = False
        self.temp_dir: str | None = None
        self.cwd_dir: str | None = None
        import ray

        self.ray = ray
        # Cap Ray's out-of-memory reruns (the owner of a task, this driver, decides).
        os.environ.setdefault("RAY_task_oom_retries", str(OOM_RETRIES))
        if ray.is_initialized():
            log.debug("using the Ray instance this process already joined")
            return
        if address:
            self.cwd_dir = tempfile.mkdtemp(prefix="sfxcwd-")
            try:
                with _neutral_cwd(self.cwd_dir):
                    ray.init(address=address, runtime_env=ship_code_runtime_env(), logging_level=logging.WARNING,
                             log_to_driver=True)
            except Exception as e:  # ConnectionError, RuntimeError, AuthenticationError, ...
                hint = ""
                if "auth" in str(e).lower() or type(e).__name__ == "AuthenticationError":
                    hint = "; the cluster uses token authentication: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN"
                raise BadInputError(f"--ray-address {address}: cannot connect to the Ray cluster ({e}){hint}") from e
            return
        os.environ.update(local_ray_env())
        self.temp_dir = tempfile.mkdtemp(prefix="sfxray-", dir="/tmp")  # short: Ray's socket paths are limited
        kw: dict[str, Any] = {}
        if device != "cuda":
            kw["num_gpus"] = 0
        with _neutral_cwd(os.path.join(self.temp_dir, "cwd")):
            ray.init(
                num_cpus=min(workers or usable_cpus(), usable_cpus()),  # never more CPUs than the machine has
                include_dashboard=False,
                _temp_dir=self.temp_dir,
                _node_ip_address="127.0.0.1",
                logging_level=logging.WARNING,
                log_to_driver=True,
                **kw,
            )
        self.started = True

    def close(self, ok: bool) -> None:
        if not self.started:
            return
        self.ray.shutdown()
        if self.temp_dir:
            if ok:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
            else:
                log.info("Ray's logs for this run are in %s", self.temp_dir)



def _io_cause(e: BaseException) -> OSError | None:
    seen = 0
    cur: BaseException | None = e
    while cur is not None and seen < 8:
        if isinstance(cur, OSError) and not isinstance(cur, (FileNotFoundError, PermissionError, IsADirectoryError)):
            return cur
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None


def _task_body(ctx: TaskContext, files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run inside a Ray worker: write each file of the group in order."""
    import ray
    import torch

    torch.set_num_threads(max(1, ctx.threads))

    results = []
    host = socket.gethostname()
    node_id = ray.get_runtime_context().get_node_id()
    for f in files:
        try:
            r = write_file_task(ctx, f)
        except ShardfixError as e:
            cause = _io_cause(e)
            if cause is not None and not isinstance(e, RetryableIOError):
                raise RetryableIOError(str(e), e.exit_code) from e
            raise
        except OSError as e:
            if _io_cause(e) is not None:
                raise RetryableIOError(f"{f['name']}: I/O error ({e})") from e
            raise
        r.update(node=host, node_id=node_id, pid=os.getpid())
        results.append(r)
    return results


def group_files(files: list[OutputFile], slots: int, budget: int | None = None) -> list[list[OutputFile]]:
    """Group consecutive small files so that each task writes about ``budget`` bytes.

    The budget is at most ``TASK_BYTES`` and small enough that there are about four tasks per
    slot, so small outputs still spread over the cluster; a file larger than the budget is a
    task of its own.
    """
    if not files:
        return []
    total = sum(f.nbytes for f in files)
    if budget is None:
        env = os.environ.get("SHARDFIX_TASK_BYTES")
        cap = int(env) if env else TASK_BYTES
        budget = min(cap, max(1, math.ceil(total / (4 * max(1, slots)))))
    return pack_in_order(files, budget)


def task_memory(group: list[OutputFile]) -> int:
    """Bytes of memory a task asks Ray for: its largest tensor, read and transformed, plus a base."""
    largest = max((t.nbytes for f in group for t in f.tensors), default=0)
    return TASK_BASE_MEMORY + 3 * largest


def _names(group: list[OutputFile]) -> str:
    names = [f.name for f in group]
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)} files)"


NAME = "ray"


def _slots(ray: Any, cuda: bool, address: str | None) -> int:
    """Tasks the cluster can run at once (GPUs for a cuda run); refuse a cuda run without GPUs."""
    resources = ray.cluster_resources()
    if cuda and resources.get("GPU", 0) < 1:
        where = f"the Ray cluster at {address}" if address else "the local Ray instance"
        raise BadInputError(f"--device cuda: {where} has no GPUs; use --device cpu or a cluster with GPU nodes")
    return int(resources.get("GPU", 0)) if cuda else int(resources.get("CPU", 1))


def _describe(ray: Any, rt: RayRuntime, info: dict[str, Any], tasks: int, limit: int) -> None:
    resources = ray.cluster_resources()
    info.update(tasks=tasks, in_flight=limit, nodes=sum(1 for n in ray.nodes() if n.get("Alive")),
                cluster_cpus=resources.get("CPU", 0), cluster_gpus=resources.get("GPU", 0),
                retries={"worker_death_or_io": MAX_RETRIES, "out_of_memory": OOM_RETRIES})
    if rt.started:
        info["local_instance"] = {"temp_dir": rt.temp_dir, "removed_after": True}


class RayExecutor:
    """Runs the files as Ray tasks with at most ``--workers`` (default: cluster slots) in flight."""

    name = NAME

    def run(self, request: RunRequest) -> list[dict[str, Any]]:
        if not request.files:
            return []
        rt = RayRuntime(request.address, request.workers, request.ctx.device)
        pending: dict[Any, list[OutputFile]] = {}
        ok = False
        try:
            results = self._run(rt, request, pending)
            ok = True
            return results
        finally:
            for ref in pending:
                try:
                    rt.ray.cancel(ref, force=True)
                except Exception:  # already finished or the instance is gone
                    pass
            rt.close(ok)

    def _run(self, rt: RayRuntime, request: RunRequest, pending: dict[Any, list[OutputFile]]) -> list[dict[str, Any]]:
        ray = rt.ray
        cuda = request.ctx.device == "cuda"
        cpus_per_task = 1
        limit = max(1, request.workers or _slots(ray, cuda, request.address))
        groups = group_files(request.files, limit)
        node_memory = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        task_ctx = request.ctx.with_threads(cpus_per_task)
        remote = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=[RetryableIOError])(_task_body)
        _describe(ray, rt, request.info, len(groups), limit)
        queue = sorted(groups, key=lambda g: -sum(f.nbytes for f in g))  # big first: better packing
        results: list[dict[str, Any]] = []
        while queue or pending:
            while queue and len(pending) < limit:
                g = queue.pop(0)
                opts: dict[str, Any] = {"num_cpus": cpus_per_task, "num_gpus": 1 if cuda else 0}
                mem = task_memory(g)
                if node_memory and mem < 0.8 * node_memory:
                    opts["memory"] = mem
                pending[remote.options(**opts).remote(task_ctx, [asdict(f) for f in g])] = g
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                g = pending.pop(ref)
                results.extend(_get(ray, ref, g))
                request.progress.advance(sum(f.nbytes for f in g), g[-1].name)
        return results


EXECUTOR = RayExecutor()


def _get(ray: Any, ref: Any, group: list[OutputFile]) -> list[dict[str, Any]]:
    what = _names(group)
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, ShardfixError):
            if isinstance(cause, RetryableIOError):
                raise RetryableIOError(f"{cause} (after {MAX_RETRIES} retries)", cause.exit_code) from None
            raise cause from None
        raise InternalError(f"task for {what} failed: {cause if cause is not None else e}") from e
    except ray.exceptions.OutOfMemoryError as e:
        raise InternalError(
            f"task for {what} was killed by Ray's out-of-memory monitor ({OOM_RETRIES + 1} attempts); "
            "lower --workers, use a smaller --max-shard-size, or run on nodes with more memory"
        ) from e
    except ray.exceptions.RayError as e:
        raise InternalError(f"task for {what} failed after {MAX_RETRIES} retries: {type(e).__name__}: {e}") from e
