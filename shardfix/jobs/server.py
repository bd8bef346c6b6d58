"""Ray's job server: ``shardfix submit``, ``status``, ``logs`` and ``stop``.

``submit`` sends a job file to the job server (the dashboard's HTTP port, 8265 by default) with a
runtime environment made of the ``shardfix`` package (``py_modules``) and a working directory
holding the job file with its paths made absolute; the entrypoint is
``PYTHON -m shardfix convert --job shardfix-job.toml``, which (``RAY_ADDRESS`` being set in a job)
runs its tasks on that cluster. With token authentication (``RAY_AUTH_MODE=token``) the client
sends ``RAY_AUTH_TOKEN`` (or the token in ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``).
Every failure the user can fix is a :class:`BadInputError` (exit 2).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shardfix.errors import BadInputError, ShardfixError
from shardfix.jobs.jobfile import Job, job_toml, load_job

log = logging.getLogger(__name__)

JOB_FILE_NAME = "shardfix-job.toml"
#: How long ``submit`` retries while a freshly started head has no job agent yet.
SUBMIT_RETRY_SECONDS = 60.0
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
#: The ``shardfix`` package directory, shipped to the job as a ``py_module``.
PACKAGE_DIR = Path(__file__).resolve().parents[1]
_RESOURCE_KEYS = ("entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_memory", "entrypoint_resources")


def job_server_address(address: str | None) -> str:
    """``--address``, else ``RAY_API_SERVER_ADDRESS``, else an http ``RAY_ADDRESS``; as an http URL."""
    addr = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not addr:
        env = os.environ.get("RAY_ADDRESS", "")
        addr = env if env.startswith(("http://", "https://")) else None
    if not addr:
        raise BadInputError("--address: give the job server's URL, e.g. --address http://HEAD:8265 "
                            "(or export RAY_API_SERVER_ADDRESS)")
    if "://" not in addr:
        addr = "http://" + addr
    return addr.rstrip("/")


def _auth_hint(e: BaseException) -> str:
    text = str(e).lower()
    # status codes as whole words: a port such as 54019 must not read as HTTP 401
    words = set(re.findall(r"[a-z0-9]+", text))
    if "forbidden" in text or "invalid authentication" in text or "403" in words:
        return ("; the cluster rejected the token: check that RAY_AUTH_TOKEN (or the file in RAY_AUTH_TOKEN_PATH, "
                "or ~/.ray/auth_token) holds the cluster's token")
    if "401" in words or any(w in text for w in ("unauthorized", "authentication", "token")):
        return ("; the cluster uses token authentication: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<token> "
                "(or RAY_AUTH_TOKEN_PATH=<file>) before running shardfix")
    return ""


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def client(address: str | None) -> Any:
    """A ``JobSubmissionClient`` for the job server; connection problems are clear exit-2 errors."""
    url = job_server_address(address)
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:  # pragma: no cover - ray is a dependency
        raise BadInputError(f"shardfix submit needs ray[default] installed ({e})") from e
    if not log.isEnabledFor(logging.DEBUG):  # Ray sets its SDK loggers to INFO on import: keep them quiet
        for name in [n for n in logging.root.manager.loggerDict if n == "ray" or n.startswith("ray.")]:
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return JobSubmissionClient(url)
    except Exception as e:  # ConnectionError, RuntimeError, ...
        hint = _auth_hint(e)
        if hint:
            raise BadInputError(f"--address {url}: the job server refused the request ({_first_line(e)}){hint}") from e
        raise BadInputError(f"--address {url}: cannot reach Ray's job server ({_first_line(e)}); is the head "
                            "running with its dashboard (ray start --head --include-dashboard=true) and is the "
                            "port the dashboard port (8265 by default)?") from e


def _call(what: str, job_id: str, fn: Any, *args: Any, **kw: Any) -> Any:
    try:
        return fn(*args, **kw)
    except ShardfixError:
        raise
    except Exception as e:
        text = str(e)
        if "does not exist" in text or "404" in text or "not found" in text.lower():
            raise BadInputError(f"{what}: no job {job_id!r} on this job server (shardfix status lists none by "
                                "that id; check the id and --address)") from e
        raise BadInputError(f"{what} {job_id}: the job server refused ({_first_line(e)}){_auth_hint(e)}") from e


def new_submission_id(name: str) -> str:
    """``shardfix-NAME-TIME-RANDOM``, NAME reduced to letters, digits, ``_`` and ``-``."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40] or "job"
    return f"shardfix-{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def runtime_env_for(job: Job, working_dir: Path) -> dict[str, Any]:
    """Runtime environment of a submitted job: the job file as working_dir, shardfix as a py_module."""
    env: dict[str, Any] = {
        "working_dir": str(working_dir),
        "py_modules": [str(PACKAGE_DIR)],
        "excludes": ["__pycache__", "*.pyc"],
        "env_vars": {"PYTHONUNBUFFERED": "1", **job.submit.env_vars},
    }
    if job.submit.pip:
        env["pip"] = list(job.submit.pip)
    return env


def entrypoint_for(job: Job) -> str:
    """The job's shell command; ``python`` was validated as an interpreter path and is quoted besides."""
    return f"{shlex.quote(job.submit.python)} -m shardfix convert --job {JOB_FILE_NAME}"


def _submit_once(c: Any, job: Job, sid: str, tmp: Path) -> str:
    kw: dict[str, Any] = {}
    for key in _RESOURCE_KEYS:
        value = getattr(job.submit, key)
        if value is not None:
            kw[key] = int(value) if key == "entrypoint_memory" else value
    metadata = {"shardfix_job": job.name, "source": job.source, "output": job.output, **job.submit.metadata}
    deadline = time.monotonic() + SUBMIT_RETRY_SECONDS
    while True:
        try:
            return str(c.submit_job(entrypoint=entrypoint_for(job), runtime_env=runtime_env_for(job, tmp),
                                    submission_id=sid, metadata=metadata, **kw))
        except Exception as e:
            # A head that has just started may not have its job agent up yet ("No available agent").
            if "try again later" in str(e) and time.monotonic() < deadline:
                log.debug("job server not ready (%s); retrying", _first_line(e))
                time.sleep(1.0)
                continue
            hint = _auth_hint(e)
            if "No available agent" in str(e):
                hint = (f"; no node's dashboard agent answered for {SUBMIT_RETRY_SECONDS:.0f}s: check "
                        "dashboard_agent.log in the head's session logs (a port clash with another Ray instance "
                        "on the node is a common cause: set --dashboard-agent-listen-port)")
            raise BadInputError(f"submit {sid}: the job server refused ({_first_line(e)}){hint}") from e


def submit(job_path: str, address: str | None, *, submission_id: str | None = None) -> str:
    """Submit a job file to Ray's job server; return the submission id."""
    job = load_job(job_path)
    c = client(address)
    sid = submission_id or new_submission_id(job.name)
    tmp = Path(tempfile.mkdtemp(prefix="shardfix-submit-"))
    try:
        (tmp / JOB_FILE_NAME).write_text(job_toml(job))
        return _submit_once(c, job, sid, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def job_info(job_id: str, address: str | None) -> dict[str, Any]:
    """The job's status, message, entrypoint, times, metadata and driver exit code."""
    c = client(address)
    info = _call("status", job_id, c.get_job_info, job_id)
    d = info.dict() if hasattr(info, "dict") else dict(vars(info))
    status = d.get("status")
    d["status"] = getattr(status, "value", str(status))
    return {k: v for k, v in d.items() if k in ("submission_id", "status", "message", "entrypoint", "start_time",
                                              "end_time", "metadata", "driver_exit_code", "error_type")}


def job_logs(job_id: str, address: str | None) -> str:
    """The job's log so far."""
    c = client(address)
    return str(_call("logs", job_id, c.get_job_logs, job_id))


def follow_logs(job_id: str, address: str | None, out: Any = None) -> None:
    """Stream the job's log until it ends (polls when the streaming endpoint is unavailable)."""
    import asyncio

    out = out or sys.stdout
    c = client(address)

    async def tail() -> None:
        async for lines in c.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(tail())
        return
    except Exception as e:  # websocket refused (proxy, auth): fall back to polling
        log.debug("streaming logs failed (%s); polling", e)
    shown = 0
    while True:
        text = _call("logs", job_id, c.get_job_logs, job_id)
        out.write(text[shown:])
        out.flush()
        shown = len(text)
        if job_info(job_id, address)["status"] in TERMINAL:
            text = _call("logs", job_id, c.get_job_logs, job_id)
            out.write(text[shown:])
            return
        time.sleep(1.0)


def wait(job_id: str, address: str | None, *, timeout: float | None = None, poll: float = 1.0) -> dict[str, Any]:
    """Poll until the job ends; return its final info."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        info = job_info(job_id, address)
        if info["status"] in TERMINAL:
            return info
        if deadline is not None and time.monotonic() > deadline:
            raise ShardfixError(f"job {job_id} still {info['status']} after {timeout:.0f}s")
        time.sleep(poll)


def stop(job_id: str, address: str | None) -> bool:
    """Ask the job server to stop the job; False when it had already ended."""
    c = client(address)
    return bool(_call("stop", job_id, c.stop_job, job_id))


def exit_code_of(info: dict[str, Any]) -> int:
    """The exit code ``submit --wait`` returns for a finished job."""
    if info["status"] == "SUCCEEDED":
        return 0
    code = info.get("driver_exit_code")
    return code if code in (1, 2) else 1
