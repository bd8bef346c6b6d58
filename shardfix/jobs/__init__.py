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

Modules, one job each:

- :mod:`.jobfile` reads and validates job files (option keys checked against
  :data:`shardfix.options.OPTIONS`) and writes the self-contained copy ``submit`` sends;
- :mod:`.submit_spec` validates the ``[submit]`` table (``python`` must be an interpreter path);
- :mod:`.server` is the client of Ray's job server: submit, status, logs, wait, stop.
"""

from __future__ import annotations

from shardfix.jobs.jobfile import JOB_KEYS, Job, job_toml, load_job, read_options, unknown_key
from shardfix.jobs.server import (
    JOB_FILE_NAME,
    PACKAGE_DIR,
    SUBMIT_RETRY_SECONDS,
    TERMINAL,
    client,
    entrypoint_for,
    exit_code_of,
    follow_logs,
    job_info,
    job_logs,
    job_server_address,
    new_submission_id,
    runtime_env_for,
    stop,
    submit,
    wait,
)
from shardfix.jobs.submit_spec import SUBMIT_KEYS, SubmitSpec, read_submit

__all__ = [
    "JOB_FILE_NAME", "JOB_KEYS", "PACKAGE_DIR", "SUBMIT_KEYS", "SUBMIT_RETRY_SECONDS", "TERMINAL", "Job", "SubmitSpec",
    "client", "entrypoint_for", "exit_code_of", "follow_logs", "job_info", "job_logs", "job_server_address", "job_toml",
    "load_job", "new_submission_id", "read_options", "read_submit", "runtime_env_for", "stop", "submit", "unknown_key",
    "wait",
]
