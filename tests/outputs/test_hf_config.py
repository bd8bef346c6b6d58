"""The Hugging Face sidecar decisions: config.json changes and conflicts, tokenizer files, where sidecars are found."""

from __future__ import annotations

import json
from pathlib import Path, PurePath

import pytest

from shardfix.errors import BadInputError
from shardfix.outputs.hf_config import (
    ConfigFacts,
    generation_config_candidates,
    reconcile_config,
    sidecar_candidates,
    tied_duplicates,
    tokenizer_files,
)
from shardfix.outputs.hf_files import find_config, find_generation_config, list_tokenizer_files

LLAMA = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 32, "tie_word_embeddings": False}


def test_padded_vocab_is_set_to_the_true_vocab_and_recorded() -> None:
    out, changes = reconcile_config(LLAMA, ConfigFacts(vocab_size=1000, padded_vocab=1024, tied=False), "cfg")
    assert out["vocab_size"] == 1000 and LLAMA["vocab_size"] == 1024  # the input is not modified
    assert changes == [{"key": "vocab_size", "from": 1024, "to": 1000, "because": "--vocab-size"}]


def test_nothing_to_change() -> None:
    cfg = {**LLAMA, "vocab_size": 1000}
    out, changes = reconcile_config(cfg, ConfigFacts(vocab_size=1000, padded_vocab=1024, tied=False), "cfg")
    assert out == cfg and changes == []


def test_a_vocab_that_is_neither_padded_nor_true_is_a_conflict() -> None:
    with pytest.raises(BadInputError, match=r"^cfg.json: vocab_size is 2048, but --tokenizer gives 1000"):
        reconcile_config({**LLAMA, "vocab_size": 2048},
                         ConfigFacts(vocab_size=1000, vocab_from="--tokenizer", padded_vocab=1024), "cfg.json")


def test_multimodal_config_changes_text_config() -> None:
    cfg = {"model_type": "llava", "text_config": {"model_type": "llama", "vocab_size": 1024}}
    out, changes = reconcile_config(cfg, ConfigFacts(vocab_size=1000, padded_vocab=1024), "cfg")
    assert out["text_config"]["vocab_size"] == 1000 and changes[0]["key"] == "text_config.vocab_size"


def test_tied_fact_is_written_when_absent_and_a_contradiction_is_an_error() -> None:
    cfg = {k: v for k, v in LLAMA.items() if k != "tie_word_embeddings"}
    out, changes = reconcile_config(cfg, ConfigFacts(tied=True, tied_from="lm_head.weight equals embed"), "cfg")
    assert out["tie_word_embeddings"] is True
    assert changes == [{"key": "tie_word_embeddings", "from": None, "to": True, "because": "lm_head.weight equals embed"}]
    with pytest.raises(BadInputError, match="tie_word_embeddings is false, but the checkpoint has tied embeddings"):
        reconcile_config(LLAMA, ConfigFacts(tied=True), "cfg")


def test_dtype_change_and_missing_model_type() -> None:
    out, changes = reconcile_config({**LLAMA, "torch_dtype": "float32"}, ConfigFacts(dtype="bfloat16"), "cfg")
    assert out["torch_dtype"] == "bfloat16" and changes[0]["because"] == "--dtype"
    with pytest.raises(BadInputError, match="no model_type"):
        reconcile_config({"vocab_size": 1000}, ConfigFacts(), "x/config.json")


def test_tied_duplicates() -> None:
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    assert tied_duplicates(names, tied=True) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert tied_duplicates(names, tied=False) == {}
    assert tied_duplicates(["model.embed_tokens.weight"], tied=True) == {}


def test_tokenizer_files_picks_what_autotokenizer_reads() -> None:
    names = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "config.json",
             "model.safetensors", "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json",
             "additional_chat_templates/tool.jinja", "sub/vocab.json", "generation_config.json", "spiece.model"]
    assert tokenizer_files(names) == sorted(["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                             "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
                                             "added_tokens.json", "additional_chat_templates/tool.jinja", "spiece.model"])


def test_sidecar_candidates_order() -> None:
    src = PurePath("/run/checkpoint")
    assert sidecar_candidates(src, True) == [PurePath("/run/checkpoint/config.json"),
                                             PurePath("/run/checkpoint/huggingface/config.json"),
                                             PurePath("/run/config.json")]
    assert sidecar_candidates(PurePath("/run/ckpt.pt"), False) == [PurePath("/run/config.json"),
                                                                    PurePath("/run/huggingface/config.json")]
    gen = generation_config_candidates(PurePath("/cfg/config.json"), src, True)
    assert gen[0] == PurePath("/cfg/generation_config.json") and gen[-1] == PurePath("/run/generation_config.json")


def test_finders_on_disk(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    assert find_config(ckpt) is None
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    (tmp_path / "generation_config.json").write_text("{}")
    assert find_config(ckpt) == tmp_path / "config.json"
    (ckpt / "config.json").write_text(json.dumps(LLAMA))  # in the source dir wins over beside it
    assert find_config(ckpt) == ckpt / "config.json"
    assert find_generation_config(ckpt / "config.json", ckpt) == tmp_path / "generation_config.json"
    tok = tmp_path / "tok"
    tok.mkdir()
    for n in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (tok / n).write_text("{}")
    assert [p.name for p in list_tokenizer_files(tok / "tokenizer.json")] == ["tokenizer.json", "tokenizer_config.json"]
    with pytest.raises(BadInputError, match="--tokenizer"):
        list_tokenizer_files(tmp_path / "nope")
