"""The option spec is the one source of truth: argparse flags and job-file keys both come from it.

Fast: no processes, no checkpoints. Parses argv in-process and reads job files from tmp_path.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import pytest

from shardfix.cli import _options, build_parser
from shardfix.errors import BadInputError
from shardfix.jobs import JOB_KEYS, load_job
from shardfix.options import OPTION_BY_NAME, OPTIONS, ConvertOptions


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _flags(command: str) -> dict[str, argparse.Action]:
    """Long flag -> action, for every option-taking flag of COMMAND."""
    return {s: a for a in _subparser(command)._actions for s in a.option_strings if s.startswith("--")}


def _job(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(f'source = "a"\noutput = "b"\n{body}\n')
    return path


def test_every_field_is_an_option_but_extra():
    names = [f.name for f in fields(ConvertOptions)]
    assert [o.name for o in OPTIONS] == [n for n in names if n != "extra"]
    assert ConvertOptions.field_names() == [o.name for o in OPTIONS]
    assert set(ConvertOptions().to_dict()) == set(OPTION_BY_NAME)


def test_every_field_has_a_convert_flag_and_every_flag_a_field():
    flags = _flags("convert")
    for o in OPTIONS:
        assert flags[o.flag].dest == o.name, o.flag
        if o.off_flag:
            assert flags[o.off_flag].dest == o.name
    not_options = {"--help", "--job"}
    assert {a.dest for f, a in flags.items() if f not in not_options} == set(OPTION_BY_NAME)


def test_flag_defaults_match_field_defaults():
    args = build_parser().parse_args(["convert", "src", "out"])
    for o in OPTIONS:
        assert getattr(args, o.name) == o.default, o.name


def test_plan_and_inspect_share_the_specs():
    plan = _flags("plan")
    assert {a.dest for f, a in plan.items() if f not in ("--help", "--json")} == {
        o.name for o in OPTIONS if o.group == "reconcile" or o.plan}
    inspect = _flags("inspect")
    for name in ("profile", "target_config", "trust_pickle"):
        assert inspect[OPTION_BY_NAME[name].flag].dest == name


def test_flag_names_are_field_names_with_dashes():
    for o in OPTIONS:
        expected = "--" + o.name.replace("_", "-")
        assert o.flag == (expected if o.sets else "--no-" + expected[2:]), o.name
    assert OPTION_BY_NAME["progress"].off_flag == "--no-progress"


def test_parsed_flags_build_options():
    args = build_parser().parse_args(["convert", "s", "o", "--vocab-size", "7", "--no-verify", "--no-progress",
                                      "--dtype", "bf16", "--max-shard-size", "1KB", "--split-fused"])
    opts = _options(args)
    assert (opts.vocab_size, opts.verify, opts.progress, opts.dtype, opts.max_shard_size, opts.split_fused) == (
        7, False, False, "bf16", 1000, True)


def test_bad_choice_on_the_command_line_exits_2_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["convert", "s", "o", "--executor", "spark"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--executor" in err and err.count("\n") == 1


def test_job_keys_are_field_names(tmp_path):
    body = "\n".join(f"{o.name} = {_toml_example(o)}" for o in OPTIONS if o.name not in ("resume",))
    job = load_job(_job(tmp_path, body))
    for o in OPTIONS:
        if o.name != "resume" and not o.path:
            assert getattr(job.options, o.name) == _expected(o), o.name
    assert set(JOB_KEYS).isdisjoint(OPTION_BY_NAME)


def _toml_example(o):
    if o.choices:
        return f'"{o.choices[-1]}"'
    return {"int": "3", "str": '"x"', "bool": "true", "size": '"2KB"'}[o.kind]


def _expected(o):
    if o.choices:
        return o.choices[-1]
    return {"int": 3, "str": "x", "bool": True, "size": 2000}[o.kind]


@pytest.mark.parametrize("name", [o.name for o in OPTIONS])
def test_wrong_type_names_the_key_and_file(tmp_path, name):
    o = OPTION_BY_NAME[name]
    wrong = "[1]" if o.kind == "size" else ('"1"' if o.kind != "str" else "1")
    path = _job(tmp_path, f"{name} = {wrong}")
    with pytest.raises(BadInputError) as e:
        load_job(path)
    assert f"{name} must be {o.type_name}" in str(e.value) and str(path) in str(e.value)


def test_bool_is_not_an_integer(tmp_path):
    with pytest.raises(BadInputError, match="workers must be an integer, got True"):
        load_job(_job(tmp_path, "workers = true"))


@pytest.mark.parametrize("name", [o.name for o in OPTIONS if o.choices])
def test_bad_choice_names_the_key(tmp_path, name):
    path = _job(tmp_path, f'{name} = "nope"')
    with pytest.raises(BadInputError) as e:
        load_job(path)
    o = OPTION_BY_NAME[name]
    msg = str(e.value)
    assert f"{o.flag}: 'nope' is not one of {', '.join(o.choices)}" in msg and f"job key {name}" in msg
    assert str(path) in msg


@pytest.mark.parametrize("key, hint", [
    ("max_shard_sise", "did you mean 'max_shard_size'?"),
    ("no-optimizer", "write no_optimizer"),
    ("extra", "unknown key 'extra'"),
    ("frobnicate", "unknown key 'frobnicate'"),
])
def test_unknown_keys_name_the_key(tmp_path, key, hint):
    path = _job(tmp_path, f"{key} = 1")
    with pytest.raises(BadInputError) as e:
        load_job(path)
    assert hint in str(e.value) and str(path) in str(e.value)


def test_path_options_resolve_against_the_job_file(tmp_path):
    body = "\n".join(f'{o.name} = "rel/{o.name}"' for o in OPTIONS if o.path)
    job = load_job(_job(tmp_path, body))
    for o in OPTIONS:
        if o.path:
            assert getattr(job.options, o.name) == str(tmp_path / "rel" / o.name)
    assert job.options.target_model is None and not OPTION_BY_NAME["target_model"].path


def test_library_validation_uses_the_spec_choices():
    for o in OPTIONS:
        if o.choices:
            with pytest.raises(BadInputError, match=f"{o.flag}: 'nope' is not one of"):
                ConvertOptions(**{o.name: "nope"})
