"""The ``[submit]`` table and what ``submit`` sends: fast, no Ray head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import shardfix
from shardfix.errors import BadInputError
from shardfix.jobs import SUBMIT_KEYS, SubmitSpec, entrypoint_for, load_job, runtime_env_for


def _job(tmp_path: Path, submit: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(f'source = "a"\noutput = "b"\n[submit]\n{submit}\n')
    return path


def test_submit_keys_are_the_spec_fields():
    assert set(SUBMIT_KEYS) == set(SubmitSpec.__dataclass_fields__)


@pytest.mark.parametrize("python", ["python", "python3", "python3.11", "/usr/bin/python3",
                                    "/opt/conda/envs/x-1.2/bin/python"])
def test_python_is_an_interpreter(tmp_path, python):
    job = load_job(_job(tmp_path, f'python = "{python}"'))
    assert job.submit.python == python
    assert entrypoint_for(job) == f"{python} -m shardfix convert --job shardfix-job.toml"


@pytest.mark.parametrize("python", ["python; rm -rf /", "python -c 'x'", "env python", "python3 && id", "$(id)",
                                    "py", "bin/python", "/usr/bin/python`id`", "/a b/python", "/usr/bin/python|x", "",
                                    "/"])
def test_python_refuses_shell_text(tmp_path, python):
    path = _job(tmp_path, f"python = {json.dumps(python)}")  # a JSON string is a TOML basic string
    with pytest.raises(BadInputError) as e:
        load_job(path)
    assert "[submit] python must be an interpreter path" in str(e.value) and str(path) in str(e.value)


def test_python_must_be_a_string(tmp_path):
    with pytest.raises(BadInputError, match=r"\[submit\] python must be an interpreter path"):
        load_job(_job(tmp_path, "python = 3"))


@pytest.mark.parametrize("body, needle", [
    ('entrypoint_num_gpus = -1', "[submit] entrypoint_num_gpus must be a number"),
    ('entrypoint_memory = true', "[submit] entrypoint_memory must be a size"),
    ('entrypoint_memory = "lots"', "[submit] entrypoint_memory: cannot read size"),
    ('entrypoint_resources = { a = "1" }', "[submit] entrypoint_resources must be a table of numbers"),
    ('env_vars = { A = 1 }', "[submit] env_vars must be a table of strings"),
    ('pip = "torch"', "[submit] pip must be a list of strings"),
    ('entrypoint_num_cpu = 1', "unknown key 'entrypoint_num_cpu' in [submit]; did you mean 'entrypoint_num_cpus'?"),
])
def test_bad_submit_values_name_the_key(tmp_path, body, needle):
    path = _job(tmp_path, body)
    with pytest.raises(BadInputError) as e:
        load_job(path)
    assert needle in str(e.value) and str(path) in str(e.value)


def test_good_submit_table(tmp_path):
    job = load_job(_job(tmp_path, 'entrypoint_num_cpus = 2\nentrypoint_memory = "1GiB"\n'
                                  'entrypoint_resources = { fast = 1 }\npip = ["zstandard"]\nmetadata = { team = "x" }'))
    s = job.submit
    assert (s.entrypoint_num_cpus, s.entrypoint_memory, s.entrypoint_resources, s.pip, s.metadata) == (
        2.0, 2**30, {"fast": 1.0}, ["zstandard"], {"team": "x"})


def test_runtime_env_ships_the_shardfix_package(tmp_path):
    job = load_job(_job(tmp_path, 'env_vars = { A = "1" }'))
    env = runtime_env_for(job, tmp_path)
    (pkg,) = env["py_modules"]
    assert Path(pkg) == Path(shardfix.__file__).resolve().parent and Path(pkg).name == "shardfix"
    assert env["env_vars"] == {"PYTHONUNBUFFERED": "1", "A": "1"} and env["working_dir"] == str(tmp_path)
