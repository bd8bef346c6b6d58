"""Reading the Hugging Face sidecar files of a checkpoint: config, generation config, tokenizer files.

The decisions (which paths, which files, what to change) are pure functions in
:mod:`shardfix.outputs.hf_config`; this module only looks at the disk, and turns every way a
file can be unreadable into one :class:`~shardfix.errors.BadInputError` naming it.
"""

from __future__ import annotations

from pathlib import Path

from shardfix.errors import BadInputError
from shardfix.outputs.hf_config import CONFIG_NAME, generation_config_candidates, sidecar_candidates, tokenizer_files
from shardfix.targets.files import read_json_object  # noqa: F401 - re-exported for the HF directory stages


def find_config(source: Path) -> Path | None:
    """The first ``config.json`` of :func:`~shardfix.outputs.hf_config.sidecar_candidates` that exists."""
    return next((p for p in map(Path, sidecar_candidates(source, source.is_dir(), CONFIG_NAME)) if p.is_file()), None)


def find_generation_config(config_path: Path | None, source: Path) -> Path | None:
    """The ``generation_config.json`` beside the chosen config, or else beside the source."""
    cands = generation_config_candidates(config_path, source, source.is_dir())
    return next((p for p in map(Path, cands) if p.is_file()), None)


def list_tokenizer_files(tokenizer: Path) -> list[Path]:
    """The tokenizer files to copy from ``--tokenizer PATH`` (a directory, or one of its files)."""
    if not tokenizer.exists():
        raise BadInputError(f"--tokenizer: {tokenizer}: no such file or directory")
    base = tokenizer if tokenizer.is_dir() else tokenizer.parent
    names = [p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()]
    return [base / n for n in tokenizer_files(names)]
