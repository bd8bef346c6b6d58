"""Job files and Ray's job server: ``convert --job``, ``submit``, ``status``, ``logs``, ``stop``.

A job file is TOML: ``source`` and ``output`` plus any ``convert`` option under its long flag
name with dashes turned to underscores (``vocab_size = 50257``, ``max_shard_size = "5GB"``,
``workers = 8``), and an optional ``[submit]`` table used only by ``shardfix submit``::

    name = "llama-fsdp2-step-2000"
    source = "/shared/ckpt/step-2000"
    output = "/shared/hf/step-2000"
    vocab_size = 50257

    [submit]
    entrypoint_num_cpus = 1
    env_vars = { OMP_NUM_THREADS = "1" }

Relative paths resolve against the job file's directory. ``shardfix submit`` sends the job to
Ray's job server (the dashboard's HTTP port, 8265 by default) with a runtime environment made of
the ``shardfix`` package (``py_modules``) and a working directory holding the job file with its
paths made absolute; the job's entrypoint is ``python -m shardfix convert --job shardfix-job.toml``,
which (``RAY_ADDRESS`` being set in a job) runs its tasks on that cluster. With token
authentication (``RAY_AUTH_MODE=token``), the client sends ``RAY_AUTH_TOKEN`` (or the token in
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from shardfix.errors import BadInputError, ShardfixError
from shardfix.options import ConvertOptions, parse_size

log = logging.getLogger(__name__)

JOB_FILE_NAME = "shardfix-job.toml"
#: How long ``submit`` retries while a freshly started head has no job agent yet.
SUBMIT_RETRY_SECONDS = 60.0
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")

_JOB_KEYS = ("name", "description", "source", "output", "submit")
_PATH_OPTIONS = ("tokenizer", "target_config", "target_shapes", "param_names", "key_map", "companions")
_SUBMIT_KEYS = {
    "entrypoint_num_cpus": "number", "entrypoint_num_gpus": "number", "entrypoint_memory": "size",
    "entrypoint_resources": "table of numbers", "env_vars": "table of strings", "pip": "list of strings",
    "python": "string", "metadata": "table of strings",
}


@dataclass(slots=True)
class SubmitSpec:
    """The ``[submit]`` table: what ``shardfix submit`` asks Ray's job server for."""

    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    entrypoint_memory: int | None = None
    entrypoint_resources: dict[str, float] | None = None
    env_vars: dict[str, str] = field(default_factory=dict)
    pip: list[str] | None = None
    python: str = "python"
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Job:
    """One conversion read from a job file."""

    path: Path
    source: str
    output: str
    options: ConvertOptions
    name: str
    description: str = ""
    submit: SubmitSpec = field(default_factory=SubmitSpec)


# -- reading job files --------------------------------------------------------------------------


def _option_types() -> dict[str, tuple[type, ...]]:
    """Accepted TOML value types per option, from ``ConvertOptions``' annotations."""
    out: dict[str, tuple[type, ...]] = {}
    for f in fields(ConvertOptions):
        if f.name == "extra":
            continue
        ann = str(f.type)
        kinds: list[type] = []
        for part in (p.strip() for p in ann.split("|")):
            kinds += {"int": [int], "str": [str], "bool": [bool], "float": [float, int]}.get(part, [])
        out[f.name] = tuple(kinds)
    return out


def _type_name(kinds: tuple[type, ...]) -> str:
    return " or ".join(dict.fromkeys({int: "an integer", str: "a string", bool: "true/false",
                                      float: "a number"}[k] for k in kinds))


def _unknown_key(path: Path, key: str, known: list[str], where: str = "") -> BadInputError:
    hint = ""
    if "-" in key and key.replace("-", "_") in known:
        hint = f"; write {key.replace('-', '_')} (flag names with dashes as underscores)"
    else:
        close = difflib.get_close_matches(key, known, n=1)
        if close:
            hint = f"; did you mean {close[0]!r}?"
    return BadInputError(f"{path}: unknown key {key!r}{where}{hint} (job keys: source, output, name, description, "
                         "[submit], and convert's long flag names with dashes as underscores, e.g. vocab_size)")


def _resolve(base: Path, value: str) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _read_submit(path: Path, table: Any) -> SubmitSpec:
    if not isinstance(table, dict):
        raise BadInputError(f"{path}: [submit] must be a table")
    spec = SubmitSpec()
    for key, value in table.items():
        kind = _SUBMIT_KEYS.get(key)
        if kind is None:
            raise _unknown_key(path, key, list(_SUBMIT_KEYS), " in [submit]")
        bad = BadInputError(f"{path}: [submit] {key} must be a {kind}, got {value!r}")
        if kind == "number":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise bad
            setattr(spec, key, float(value))
        elif kind == "size":
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise bad
            spec.entrypoint_memory = parse_size(value, f"{path}: [submit] entrypoint_memory")
        elif kind == "string":
            if not isinstance(value, str) or not value:
                raise bad
            setattr(spec, key, value)
        elif kind == "list of strings":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise bad
            setattr(spec, key, list(value))
        elif kind == "table of strings":
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise bad
            setattr(spec, key, dict(value))
        else:  # table of numbers
            if not isinstance(value, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()
            ):
                raise bad
            setattr(spec, key, {k: float(v) for k, v in value.items()})
    return spec


def load_job(path: str | os.PathLike[str]) -> Job:
    """Read and validate a job file; every problem is a :class:`BadInputError` naming the file and key."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise BadInputError(f"--job {p}: no such file") from None
    except OSError as e:
        raise BadInputError(f"--job {p}: cannot read ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise BadInputError(f"{p}: not UTF-8 text ({e})") from e
    except tomllib.TOMLDecodeError as e:
        raise BadInputError(f"{p}: not valid TOML ({e})") from e
    base = p.resolve().parent
    types = _option_types()
    known = [*_JOB_KEYS, *types]
    for key in data:
        if key not in known:
            raise _unknown_key(p, key, known)
    for key in ("source", "output"):
        if key not in data:
            raise BadInputError(f"{p}: missing {key} = \"...\" (the checkpoint to read and the directory to write)")
        if not isinstance(data[key], str) or not data[key]:
            raise BadInputError(f"{p}: {key} must be a non-empty string path, got {data[key]!r}")
    kw: dict[str, Any] = {}
    for key, value in data.items():
        if key not in types:
            continue
        kinds = types[key]
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise BadInputError(f"{p}: {key} must be {_type_name(kinds)}, got {value!r}")
        if key in _PATH_OPTIONS:
            value = _resolve(base, value)
        kw[key] = value
    try:
        options = ConvertOptions(**kw)
    except BadInputError as e:
        raise BadInputError(f"{p}: {e}") from e
    name = data.get("name", p.stem)
    desc = data.get("description", "")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise BadInputError(f"{p}: name must be 1-64 letters, digits, '.', '_' or '-', got {name!r}")
    if not isinstance(desc, str):
        raise BadInputError(f"{p}: description must be a string")
    submit = _read_submit(p, data["submit"]) if "submit" in data else SubmitSpec()
    return Job(p, _resolve(base, data["source"]), _resolve(base, data["output"]), options, name, desc, submit)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    raise TypeError(f"cannot write {v!r} as TOML")


def job_toml(job: Job) -> str:
    """The job as a self-contained TOML document: absolute paths, options that differ from the defaults."""
    lines = [f"# written by shardfix submit from {job.path.resolve()}",
             f"name = {_toml_value(job.name)}", f"source = {_toml_value(job.source)}",
             f"output = {_toml_value(job.output)}"]
    defaults = ConvertOptions().to_dict()
    for key, value in job.options.to_dict().items():
        if value is not None and value != defaults[key]:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


# -- Ray's job server ---------------------------------------------------------------------------


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
    if any(w in text for w in ("forbidden", "invalid authentication", "403")):
        return ("; the cluster rejected the token: check that RAY_AUTH_TOKEN (or the file in RAY_AUTH_TOKEN_PATH, "
                "or ~/.ray/auth_token) holds the cluster's token")
    if any(w in text for w in ("401", "unauthorized", "authentication", "token")):
        return ("; the cluster uses token authentication: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<token> "
                "(or RAY_AUTH_TOKEN_PATH=<file>) before running shardfix")
    return ""


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


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
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40] or "job"
    return f"shardfix-{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def runtime_env_for(job: Job, working_dir: Path) -> dict[str, Any]:
    """Runtime environment of a submitted job: the job file as working_dir, shardfix as a py_module."""
    pkg = Path(__file__).resolve().parent
    env: dict[str, Any] = {
        "working_dir": str(working_dir),
        "py_modules": [str(pkg)],
        "excludes": ["__pycache__", "*.pyc"],
        "env_vars": {"PYTHONUNBUFFERED": "1", **job.submit.env_vars},
    }
    if job.submit.pip:
        env["pip"] = list(job.submit.pip)
    return env


def submit(job_path: str, address: str | None, *, submission_id: str | None = None) -> str:
    """Submit a job file to Ray's job server; return the submission id."""
    job = load_job(job_path)
    c = client(address)
    sid = submission_id or new_submission_id(job.name)
    tmp = Path(tempfile.mkdtemp(prefix="shardfix-submit-"))
    try:
        (tmp / JOB_FILE_NAME).write_text(job_toml(job))
        kw: dict[str, Any] = {}
        for key in ("entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_memory", "entrypoint_resources"):
            value = getattr(job.submit, key)
            if value is not None:
                kw[key] = int(value) if key == "entrypoint_memory" else value
        metadata = {"shardfix_job": job.name, "source": job.source, "output": job.output, **job.submit.metadata}
        entrypoint = f"{job.submit.python} -m shardfix convert --job {JOB_FILE_NAME}"
        deadline = time.monotonic() + SUBMIT_RETRY_SECONDS
        while True:
            try:
                return c.submit_job(entrypoint=entrypoint, runtime_env=runtime_env_for(job, tmp),
                                    submission_id=sid, metadata=metadata, **kw)
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def job_info(job_id: str, address: str | None) -> dict[str, Any]:
    c = client(address)
    info = _call("status", job_id, c.get_job_info, job_id)
    d = info.dict() if hasattr(info, "dict") else dict(vars(info))
    status = d.get("status")
    d["status"] = getattr(status, "value", str(status))
    return {k: v for k, v in d.items() if k in ("submission_id", "status", "message", "entrypoint", "start_time",
                                              "end_time", "metadata", "driver_exit_code", "error_type")}


def job_logs(job_id: str, address: str | None) -> str:
    c = client(address)
    return _call("logs", job_id, c.get_job_logs, job_id)


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
