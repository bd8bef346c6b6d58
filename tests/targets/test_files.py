"""Target facts from tokenizers and configs; conflicts name both sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardfix.errors import BadInputError, ReconcileConflictError
from shardfix.options import ConvertOptions
from shardfix.targets.files import merge_targets, read_config, tokenizer_vocab


def test_tokenizer_json_counts_added_tokens(tmp_path: Path) -> None:
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(100)}, unk_token="w0"))
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True), AddedToken("<pad>", special=True)])
    tok.save(str(tmp_path / "tokenizer.json"))
    assert tokenizer_vocab(str(tmp_path / "tokenizer.json")) == 102
    assert tokenizer_vocab(str(tmp_path)) == 102  # a directory holding tokenizer.json


def test_sentencepiece_model(tmp_path: Path) -> None:
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog {i % 7}" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=48,
                                   model_type="bpe", minloglevel=2)
    assert tokenizer_vocab(str(tmp_path / "sp.model")) == 48


def test_config_and_conflicts(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"vocab_size": 1000, "hidden_size": 64, "num_attention_heads": 4,
                               "architectures": ["X"], "tie_word_embeddings": False}))
    assert read_config(str(cfg))["hidden_size"] == 64
    t = merge_targets(ConvertOptions(vocab_size=1000, target_config=str(cfg)))
    assert t.vocab == 1000 and t.config["num_attention_heads"] == 4
    with pytest.raises(ReconcileConflictError) as e:
        merge_targets(ConvertOptions(vocab_size=999, target_config=str(cfg)))
    assert "--vocab-size 999" in str(e.value) and str(cfg) in str(e.value)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hidden_size": "64"}))
    with pytest.raises(BadInputError, match="hidden_size"):
        read_config(str(bad))
    with pytest.raises(BadInputError, match="--tokenizer"):
        tokenizer_vocab(str(tmp_path / "missing.json"))


def test_config_alias_spellings(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 1000}))
    got = read_config(str(cfg))
    assert (got["hidden_size"], got["num_attention_heads"], got["num_hidden_layers"]) == (64, 4, 2)
    cfg.write_text(json.dumps({"n_head": 0}))
    with pytest.raises(BadInputError, match="n_head"):
        read_config(str(cfg))
