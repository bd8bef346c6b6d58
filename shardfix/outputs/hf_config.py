"""What a Hugging Face model directory's sidecar files must say, decided without touching the disk.

Owns three pure decisions for the Hugging Face directory layout (the files are read and
written elsewhere, see :mod:`shardfix.outputs.hf_files`):

* :func:`reconcile_config`: the ``config.json`` to write, given the config shardfix found and
  the facts it reconciled (true vocab, tied or not, output dtype), with one change record per
  key it changed. A config that contradicts a fact is an error naming the flag and the key.
* :func:`tokenizer_files`: which files of a tokenizer directory a client's ``AutoTokenizer``
  reads, so they can be copied beside the weights.
* :func:`sidecar_candidates`: where a ``config.json`` / ``generation_config.json`` belonging to
  a checkpoint is looked for, in order.

Rules for ``vocab_size``: a training job's own config records the *padded* vocab after
``resize_token_embeddings(n, pad_to_multiple_of=...)`` (1024 for a 1000-token tokenizer), and
``from_pretrained`` refuses trimmed weights under it. So ``vocab_size`` is rewritten to the
reconciled vocab when it says the checkpoint's padded vocab (or already says the true one);
any other value disagrees with the checkpoint and the flag, and is an error.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from shardfix.errors import BadInputError

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"

# Files a tokenizer directory may hold that AutoTokenizer reads (transformers 5: tokenization_utils_base,
# utils/hub.py CHAT_TEMPLATE_*; slow tokenizers' VOCAB_FILES_NAMES). Patterns match the path relative to the dir.
TOKENIZER_PATTERNS = (
    "tokenizer.json",            # fast tokenizer (tokenizers library)
    "tokenizer_config.json",     # class, special tokens, chat template (older versions)
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",       # transformers >= 4.43 saves the chat template on its own
    "chat_template.json",        # processors' legacy chat template file
    "additional_chat_templates/*.jinja",
    "tokenizer.model",           # SentencePiece (Llama, Mistral, Gemma)
    "tokenizer.model.v*",        # Mistral's versioned SentencePiece models
    "spiece.model",              # SentencePiece (T5, ALBERT, XLNet)
    "sentencepiece.bpe.model",   # SentencePiece (XLM-R, mBART)
    "*.spm",
    "tekken.json",               # Mistral tekken tokenizer
    "vocab.json", "merges.txt",  # byte-level BPE (GPT-2, RoBERTa, Qwen)
    "vocab.txt",                 # WordPiece (BERT)
    "tiktoken.model", "*.tiktoken",
)


@dataclass(frozen=True)
class ConfigFacts:
    """What shardfix reconciled, and the flag (or evidence) each fact came from.

    Attributes:
        vocab_size: the true vocab the weights were trimmed (or grown) to; None when not reconciled.
        vocab_from: where it came from, for the change record (``"--vocab-size"``, ``"--tokenizer"``).
        padded_vocab: the checkpoint's embedding rows before reconciling (e.g. 1024); None if unknown.
        tied: whether the written weights have tied input/output embeddings; None if unknown.
        tied_from: the evidence for ``tied`` (``"lm_head.weight equals model.embed_tokens.weight"``).
        dtype: the output's floating dtype name when ``--dtype`` cast it (``"bfloat16"``), else None.
    """

    vocab_size: int | None = None
    vocab_from: str = "--vocab-size"
    padded_vocab: int | None = None
    tied: bool | None = None
    tied_from: str = "the checkpoint"
    dtype: str | None = None


def _vocab_holder(config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The dict that holds ``vocab_size`` (a multimodal config's ``text_config``) and its key path prefix."""
    text = config.get("text_config")
    if "vocab_size" not in config and isinstance(text, dict) and "vocab_size" in text:
        return text, "text_config."
    return config, ""


def _change(key: str, old: Any, new: Any, because: str) -> dict[str, Any]:
    return {"key": key, "from": old, "to": new, "because": because}


def _reconcile_vocab(config: dict[str, Any], facts: ConfigFacts, origin: str) -> list[dict[str, Any]]:
    if facts.vocab_size is None:
        return []
    holder, prefix = _vocab_holder(config)
    key = prefix + "vocab_size"
    old = holder.get("vocab_size")
    if old == facts.vocab_size:
        return []
    if old is not None and old != facts.padded_vocab:
        raise BadInputError(
            f"{origin}: {key} is {old}, but {facts.vocab_from} gives {facts.vocab_size} and the checkpoint's "
            f"embedding has {facts.padded_vocab} rows; pass the config of this model, or fix {facts.vocab_from}")
    holder["vocab_size"] = facts.vocab_size
    return [_change(key, old, facts.vocab_size, facts.vocab_from)]


def _reconcile_tied(config: dict[str, Any], facts: ConfigFacts, origin: str) -> list[dict[str, Any]]:
    if facts.tied is None:
        return []
    holder = config
    text = config.get("text_config")
    if "tie_word_embeddings" not in config and isinstance(text, dict) and "tie_word_embeddings" in text:
        holder = text
    prefix = "" if holder is config else "text_config."
    old = holder.get("tie_word_embeddings")
    if old is None:  # the model class's default applies otherwise, and it differs between classes: say it
        holder["tie_word_embeddings"] = facts.tied
        return [_change(prefix + "tie_word_embeddings", None, facts.tied, facts.tied_from)]
    if bool(old) != facts.tied:
        want = "separate input and output embeddings" if not facts.tied else "tied embeddings"
        raise BadInputError(
            f"{origin}: {prefix}tie_word_embeddings is {str(old).lower()}, but the checkpoint has {want} "
            f"({facts.tied_from}); pass the config of this model (--target-config)")
    return []


def _reconcile_dtype(config: dict[str, Any], facts: ConfigFacts) -> list[dict[str, Any]]:
    if facts.dtype is None:
        return []
    changes = []
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]  # transformers 5 writes "dtype"
    for key in keys:
        if config.get(key) != facts.dtype:
            changes.append(_change(key, config.get(key), facts.dtype, "--dtype"))
            config[key] = facts.dtype
    return changes


def reconcile_config(config: dict[str, Any], facts: ConfigFacts, origin: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ``config.json`` to write beside the weights, and the change records.

    Args:
        config: the config as found (not modified).
        facts: what shardfix reconciled.
        origin: where the config came from, for messages (``"--target-config cfg.json"``,
            ``"ckpt/config.json (beside the source)"``).

    Returns:
        ``(config to write, changes)``; each change is ``{"key", "from", "to", "because"}``.

    Raises:
        BadInputError: the config has no ``model_type`` (``AutoModelForCausalLM`` cannot load it),
            or it contradicts a reconciled fact.
    """
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise BadInputError(f"{origin}: has no model_type, so AutoModelForCausalLM cannot load the output; "
                            "pass the model's Hugging Face config.json with --target-config")
    out = copy.deepcopy(config)
    changes = _reconcile_vocab(out, facts, origin)
    changes += _reconcile_tied(out, facts, origin)
    changes += _reconcile_dtype(out, facts)
    return out, changes


def tokenizer_files(names: Iterable[str]) -> list[str]:
    """The tokenizer files among ``names`` (paths relative to the tokenizer directory), sorted.

    Weights, configs and anything unknown are left out: a tokenizer directory is often a whole
    model directory, and only the files ``AutoTokenizer`` reads belong beside the new weights.
    """
    picked = set()
    for name in names:
        rel = PurePath(name).as_posix()
        depth = rel.count("/")
        if any(pat.count("/") == depth and fnmatch.fnmatchcase(rel, pat) for pat in TOKENIZER_PATTERNS):
            picked.add(rel)
    return sorted(picked)


def sidecar_candidates(source: PurePath, source_is_dir: bool, name: str = CONFIG_NAME) -> list[PurePath]:
    """Where a ``config.json`` (or ``generation_config.json``) of a checkpoint is looked for, first match wins.

    With ``D`` the source directory (the source itself, or the directory of a checkpoint file):

    1. ``D/name``: a Trainer ``checkpoint-N/`` or an HF directory holds its config;
    2. ``D/huggingface/name``: verl saves the model's config in ``huggingface/`` inside the actor's folder;
    3. ``D.parent/name``: a DCP folder or ``checkpoint.pt`` saved next to the job's config.

    Only for a directory source is the parent looked at; for a file, ``D`` already is its parent.
    """
    base = source if source_is_dir else source.parent
    out = [base / name, base / "huggingface" / name]
    if source_is_dir and base.parent != base:
        out.append(base.parent / name)
    return out


def generation_config_candidates(config_path: PurePath | None, source: PurePath, source_is_dir: bool) -> list[PurePath]:
    """Where ``generation_config.json`` is looked for: beside the chosen ``config.json`` first, then as it is."""
    out = [config_path.parent / GENERATION_CONFIG_NAME] if config_path is not None else []
    return out + [p for p in sidecar_candidates(source, source_is_dir, GENERATION_CONFIG_NAME) if p not in out]


# (output embedding, input embedding) pairs transformers ties when tie_word_embeddings is true
TIED_PAIRS = (
    ("lm_head.weight", "model.embed_tokens.weight"),   # Llama, Mistral, Qwen, Gemma ...
    ("lm_head.weight", "transformer.wte.weight"),      # GPT-2
    ("embed_out.weight", "gpt_neox.embed_in.weight"),  # GPT-NeoX
)


def tied_duplicates(names: Iterable[str], tied: bool) -> dict[str, str]:
    """``{output embedding: input embedding}`` to leave out of a tied model's weights.

    ``save_pretrained`` omits the tied output embedding (transformers 5 ties it back on load);
    a file that holds both, equal, loads too, but one that holds both *different* is silently
    untied. The caller drops an output name only after checking its bytes equal the input's.
    """
    if not tied:
        return {}
    present = set(names)
    return {out: inp for out, inp in TIED_PAIRS if out in present and inp in present}
