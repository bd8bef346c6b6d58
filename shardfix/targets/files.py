"""Read target facts from the user's sources and merge them; conflicts are listed together.

Sources, each a small reader:
  * ``--vocab-size N``
  * ``--tokenizer PATH``: a ``tokenizer.json`` (``tokenizers``) or a SentencePiece ``.model``
    (``sentencepiece``); the vocab is the tokenizer's size *including added tokens*.
  * ``--target-config config.json``: a Hugging Face config (``vocab_size``, ``hidden_size``,
    ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``num_hidden_layers``,
    ``tie_word_embeddings``).
  * ``--target-shapes shapes.json``: ``{"name": [dims]}`` (names after prefix stripping).
  * ``--target-model module:callable``: the model is built on the meta device (no weights
    allocated) and its ``state_dict()`` gives every name and shape; it is then *complete*:
    checkpoint tensors it lacks are mismatches.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

from shardfix.errors import BadInputError, ReconcileConflictError
from shardfix.options import ConvertOptions
from shardfix.reconcile.arch import CONFIG_ALIASES, normalise_config
from shardfix.targets import Targets

_ALIAS_SPELLINGS = frozenset(s for spellings in CONFIG_ALIASES.values() for s in spellings)
CONFIG_KEYS = (
    "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "num_hidden_layers", "tie_word_embeddings", "intermediate_size",
)


def read_json_object(path: str | Path, flag: str, what: str = "a JSON object") -> dict[str, Any]:
    """Read a JSON object for ``flag`` (or role), raising one clear error for every way it can fail."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise BadInputError(f"{flag}: cannot read {p} ({e.strerror})") from e
    except ValueError as e:
        raise BadInputError(f"{flag}: {p} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise BadInputError(f"{flag}: {p} must hold {what}")
    return data


def read_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """``--target-shapes``: ``{"name": [dims], ...}``."""
    p, data = Path(path), read_json_object(path, "--target-shapes", 'an object {"name": [dims], ...}')
    out = {}
    for k, v in data.items():
        if not isinstance(v, list) or not all(isinstance(d, int) and d >= 0 for d in v):
            raise BadInputError(f"--target-shapes: {p}: {k!r} must map to a list of non-negative ints, got {v!r}")
        out[k] = tuple(v)
    return out


def read_config(path: str) -> dict[str, Any]:
    """``--target-config``: the Hugging Face config keys shardfix uses."""
    p, data = Path(path), read_json_object(path, "--target-config", "a JSON object (a Hugging Face config.json)")
    text_config = data.get("text_config")
    if isinstance(text_config, dict):  # multimodal configs nest the LM's config
        data = {**text_config, **{k: v for k, v in data.items() if k in CONFIG_KEYS}}
    for k, v in data.items():  # validate before alias mapping, so a bad value is named as written
        if k in _ALIAS_SPELLINGS and k != "tie_word_embeddings" and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise BadInputError(f"--target-config: {p}: {k} must be a positive integer, got {v!r}")
    cfg = {k: data[k] for k in CONFIG_KEYS if data.get(k) is not None}
    cfg.update(normalise_config(data))  # n_embd, n_head, ... -> the Hugging Face names
    for k, v in cfg.items():
        if k != "tie_word_embeddings" and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise BadInputError(f"--target-config: {p}: {k} must be a positive integer, got {v!r}")
    return cfg


def tokenizer_vocab(path: str) -> int:
    """Vocab size of a tokenizer, including added tokens."""
    p = Path(path)
    if p.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise BadInputError(f"--tokenizer: {p} holds neither tokenizer.json nor tokenizer.model")
    if not p.is_file():
        raise BadInputError(f"--tokenizer: {p}: no such file")
    if p.suffix == ".json":
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise BadInputError("--tokenizer: reading tokenizer.json needs the tokenizers package "
                                "(pip install tokenizers)") from None
        try:
            tok = Tokenizer.from_file(str(p))
        except Exception as e:
            raise BadInputError(f"--tokenizer: {p} is not a readable tokenizer.json ({e})") from e
        return int(tok.get_vocab_size(with_added_tokens=True))
    try:
        import sentencepiece as spm
    except ImportError:
        raise BadInputError("--tokenizer: reading a SentencePiece model needs the sentencepiece package "
                            "(pip install sentencepiece)") from None
    try:
        sp = spm.SentencePieceProcessor(model_file=str(p))
    except Exception as e:
        raise BadInputError(f"--tokenizer: {p} is not a readable SentencePiece model ({e})") from e
    return int(sp.get_piece_size())


def model_shapes(spec: str) -> dict[str, tuple[int, ...]]:
    """``--target-model module:callable``: build on the meta device; return state_dict shapes."""
    import torch

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise BadInputError(f"--target-model: {spec!r} must look like module.path:callable")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # let users name a module in the current directory
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise BadInputError(f"--target-model: cannot import {spec} ({e})") from e
    try:
        with torch.device("meta"):
            model = fn()
    except Exception as e:
        raise BadInputError(f"--target-model: {spec}() failed on the meta device ({type(e).__name__}: {e})") from e
    if not isinstance(model, torch.nn.Module):
        raise BadInputError(f"--target-model: {spec}() returned {type(model).__name__}, not a torch.nn.Module")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def merge_targets(opts: ConvertOptions) -> Targets:
    """Collect every target fact the options name; raise listing all conflicts at once."""
    t = Targets()
    problems: list[str] = []
    vocabs: list[tuple[int, str]] = []
    if opts.vocab_size is not None:
        vocabs.append((opts.vocab_size, f"--vocab-size {opts.vocab_size}"))
    if opts.tokenizer:
        vocabs.append((tokenizer_vocab(opts.tokenizer), f"--tokenizer {opts.tokenizer}"))
    if opts.target_config:
        t.config = read_config(opts.target_config)
        t.origins["config"] = f"--target-config {opts.target_config}"
        if "vocab_size" in t.config:
            vocabs.append((t.config["vocab_size"], f"--target-config {opts.target_config} (vocab_size)"))
    if vocabs:
        t.vocab, origin = vocabs[0]
        t.origins["vocab"] = origin
        for v, o in vocabs[1:]:
            if v != t.vocab:
                problems.append(f"vocab: {origin} says {t.vocab} but {o} says {v}")
    if opts.target_model:
        t.shapes.update(model_shapes(opts.target_model))
        t.complete = True
        t.origins["shapes"] = f"--target-model {opts.target_model}"
    if opts.target_shapes:
        explicit = read_shapes(opts.target_shapes)
        for name, shape in explicit.items():
            if name in t.shapes and t.shapes[name] != shape:
                problems.append(f"{name}: {t.origins['shapes']} says {list(t.shapes[name])} but "
                                f"--target-shapes {opts.target_shapes} says {list(shape)}")
        t.shapes.update(explicit)
        t.origins["shapes"] = " and ".join(filter(None, [t.origins.get("shapes"), f"--target-shapes {opts.target_shapes}"]))
    if problems:
        raise ReconcileConflictError(problems)
    return t
