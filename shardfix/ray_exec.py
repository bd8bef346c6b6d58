"""Ray executor: one task per output file, bounded in flight, retried on worker death.

Tasks receive the source path and their file's plan (small dicts), write their own output and
return small results; no tensor ever goes through the object store. Without ``--ray-address``
a local instance is started quietly (no dashboard, a short temp dir of our own, loopback,
explicit auth mode) and shut down afterwards; with one, the run joins that cluster.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict
from typing import Any

from shardfix.errors import InternalError, ShardfixError
from shardfix.plan import OutputFile

log = logging.getLogger(__name__)

#: Retries for a task whose worker died (crash, kill, node loss). OOM kills count too.
MAX_RETRIES = 3


def local_ray_env() -> dict[str, str]:
    """Environment for a quiet, loopback-only local Ray instance."""
    return {
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEDUP_LOGS": "0",
    }


def start_ray(address: str | None, workers: int | None) -> bool:
    """Connect to ``address`` or start a local instance; return True when we started it."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        except Exception as e:  # ConnectionError, RuntimeError, ...
            raise ShardfixError(f"--ray-address {address}: cannot connect to the Ray cluster ({e})") from e
        return False
    os.environ.update(local_ray_env())
    tmp = tempfile.mkdtemp(prefix="sfxray-", dir="/tmp")
    ray.init(
        num_cpus=workers or os.cpu_count() or 1,
        include_dashboard=False,
        _temp_dir=tmp,
        _node_ip_address="127.0.0.1",
        logging_level=logging.WARNING,
        log_to_driver=True,
        configure_logging=True,
    )
    return True


def _task_body(ctx: dict[str, Any], file: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(int(ctx.get("threads", 1)))
    from shardfix.execute import write_file_task

    return write_file_task(ctx, file)


def run_ray(
    ctx: dict[str, Any], files: list[OutputFile], *, workers: int | None, address: str | None, progress: Any
) -> list[dict[str, Any]]:
    """Run one task per file on Ray with at most ``2 * workers`` in flight."""
    import ray

    started = start_ray(address, workers)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n = workers or cpus
        gpus = 1 if ctx.get("device") == "cuda" else 0
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=MAX_RETRIES,
                          retry_exceptions=[OSError])(_task_body)
        pending: dict[Any, OutputFile] = {}
        results: list[dict[str, Any]] = []
        queue = sorted(files, key=lambda f: -f.nbytes)  # big files first: better packing
        limit = max(1, 2 * n)
        while queue or pending:
            while queue and len(pending) < limit:
                of = queue.pop(0)
                pending[task.remote(ctx, asdict(of))] = of
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                of = pending.pop(ref)
                try:
                    results.append(ray.get(ref))
                except ray.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, ShardfixError):
                        raise cause from None
                    raise InternalError(f"task for {of.name} failed: {e}") from e
                except ray.exceptions.RayError as e:
                    raise InternalError(f"task for {of.name} failed after {MAX_RETRIES} retries: {e}") from e
                progress.advance(of.nbytes, of.name)
        return results
    finally:
        if started:
            ray.shutdown()
