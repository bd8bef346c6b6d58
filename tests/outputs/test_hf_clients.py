"""The pieces fit: today's ``shardfix convert`` output plus the pure sidecar functions load in real clients.

Each test converts a real checkpoint (FSDP2 on 2 gloo ranks, or torch.save) with today's
``convert``, then assembles the Hugging Face directory *by hand* from the functions the output
layout will call (:mod:`shardfix.outputs.hf_config`, :mod:`shardfix.outputs.peft`), and loads it
with ``AutoModelForCausalLM.from_pretrained`` / ``PeftModel.from_pretrained``: no missing,
unexpected or mismatched keys, and the trained model's logits restricted to the true vocab, bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the client tests need transformers (pip install -e '.[test-hf]')")
pytest.importorskip("peft", reason="the client tests need peft (pip install -e '.[test-hf]')")

from safetensors.torch import load_file, save_file  # noqa: E402

from shardfix.api import convert  # noqa: E402
from shardfix.options import ConvertOptions  # noqa: E402
from shardfix.outputs.hf_config import ConfigFacts, reconcile_config, tied_duplicates  # noqa: E402
from shardfix.outputs.hf_files import (  # noqa: E402
    find_config,
    find_generation_config,
    list_tokenizer_files,
    read_json_object,
)
from shardfix.outputs.peft import check_adapter_config, split_names  # noqa: E402
from shardfix.targets.files import tokenizer_vocab  # noqa: E402
from tests.conftest import bits_equal  # noqa: E402
from tests.hf_clients import check_model, check_peft  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def hf_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.producers.hf_models import make_all

    return make_all(tmp_path_factory.mktemp("hf"))


def _convert(src: Path, out: Path, **kw) -> dict:
    tok = src.parent / "tokenizer" if src.is_dir() else src.parent / "tokenizer"
    report = convert(src, out, ConvertOptions(tokenizer=str(tok), executor="inline", progress=False, **kw))
    assert report["status"] == "complete"
    return report


def _sidecars(src: Path, out: Path, tied: bool) -> list[dict]:
    """What the HF layout will add: config.json (reconciled), generation_config.json, tokenizer files."""
    tok = src.parent / "tokenizer"
    cfg_path = find_config(src)
    assert cfg_path == src.parent / "config.json"
    facts = ConfigFacts(vocab_size=tokenizer_vocab(str(tok)), vocab_from="--tokenizer", padded_vocab=1024, tied=tied,
                        tied_from="lm_head.weight equals model.embed_tokens.weight" if tied else "lm_head.weight differs")
    config, changes = reconcile_config(read_json_object(cfg_path, "config.json"), facts, str(cfg_path))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gen = find_generation_config(cfg_path, src)
    assert gen is not None
    shutil.copyfile(gen, out / gen.name)
    for f in list_tokenizer_files(tok):
        shutil.copyfile(f, out / f.name)
    return changes


def _drop_tied(out: Path) -> None:
    """Tied embeddings the way save_pretrained writes them: the output embedding left out."""
    weights = load_file(out / "model.safetensors")
    for dup, kept in tied_duplicates(weights, tied=True).items():
        assert bits_equal(weights[dup], weights[kept]), f"{dup} is not a copy of {kept}"
        del weights[dup]
    save_file(weights, out / "model.safetensors")


@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_from_pretrained(hf_runs: Path, tmp_path: Path, variant: str) -> None:
    run = hf_runs / variant
    out = tmp_path / "out"
    _convert(run / "checkpoint", out)
    changes = _sidecars(run / "checkpoint", out, tied=variant == "tied")
    assert changes == [{"key": "vocab_size", "from": 1024, "to": 1000, "because": "--tokenizer"}]
    if variant == "tied":
        _drop_tied(out)
    reference = torch.load(run / "reference.pt", weights_only=True)
    model = check_model(out, reference)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (variant == "tied")
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(out)) == 1000


def _split_adapter(src: Path, out: Path) -> None:
    """Base model under plain names in OUT, the adapter under PEFT's saved names in OUT/adapter."""
    weights = load_file(out / "model.safetensors")
    split = split_names(weights)
    cfg = read_json_object(src.parent / "adapter_config.json", "--adapter-config")
    check_adapter_config(cfg, {k: tuple(v.shape) for k, v in weights.items()}, "adapter_config.json")
    save_file({split.base[k]: weights[k] for k in split.base}, out / "model.safetensors")
    (out / "adapter").mkdir()
    save_file({split.adapter[k]: weights[k] for k in split.adapter}, out / "adapter" / "adapter_model.safetensors")
    shutil.copyfile(src.parent / "adapter_config.json", out / "adapter" / "adapter_config.json")


@pytest.mark.parametrize(("variant", "src"), [("lora_dcp", "checkpoint"), ("lora_torchsave", "checkpoint.pt")])
def test_peft_adapter(hf_runs: Path, tmp_path: Path, variant: str, src: str) -> None:
    run = hf_runs / variant
    out = tmp_path / "out"
    _convert(run / src, out, trainable="lora_")
    _sidecars(run / src, out, tied=False)
    _split_adapter(run / src, out)
    reference = torch.load(run / "reference.pt", weights_only=True)
    check_peft(out, reference)
    # the adapters' optimizer state is written under the wrapped names, as today
    optim = load_file(out / "optimizer.safetensors")
    assert optim and all(".lora_" in k for k in optim)
