"""``shardfix convert`` writes a directory fine-tuning loads as is: real transformers and peft, offline.

Each test converts a real checkpoint (FSDP2 on 2 gloo ranks with DCP, or torch.save; a tiny Llama
with GQA whose vocab 1000 is padded to 1024; see ``tests/producers/hf_models.py``) with the CLI:
``shardfix convert SRC OUT --vocab-size 1000 --tokenizer TOKDIR``. The config and
``adapter_config.json`` are the ones the training run saved beside the checkpoint (or given with
``--adapter-config``). Then ``AutoModelForCausalLM.from_pretrained(OUT)`` /
``PeftModel.from_pretrained(..., OUT/adapter)`` load with no missing, unexpected or mismatched keys
and give the trained model's logits restricted to the true vocab, bit for bit; ``shardfix verify OUT
--against SRC`` passes (run in-process: ``verify_output``; it also checks that the ledger covers every source key exactly once).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the client tests need transformers (pip install -e '.[test-hf]')")
pytest.importorskip("peft", reason="the client tests need peft (pip install -e '.[test-hf]')")

import shardfix  # noqa: E402
from shardfix.api import convert  # noqa: E402
from shardfix.errors import BadInputError, OutputError  # noqa: E402
from shardfix.options import ConvertOptions  # noqa: E402
from shardfix.verify import verify_output  # noqa: E402
from tests.conftest import run_cli  # noqa: E402
from tests.hf_clients import check_model, check_peft  # noqa: E402

pytestmark = pytest.mark.slow

TOKENIZER_FILES = ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="session")
def hf_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The producers' runs; ``SHARDFIX_TEST_HF_RUNS=DIR`` reuses ``python -m tests.producers.hf_models DIR``."""
    from tests.producers.hf_models import make_all

    if os.environ.get("SHARDFIX_TEST_HF_RUNS"):
        return Path(os.environ["SHARDFIX_TEST_HF_RUNS"])
    return make_all(tmp_path_factory.mktemp("hf"))


def _cli_convert(src: Path, out: Path, *extra: str | Path) -> dict:
    r = run_cli("convert", src, out, "--vocab-size", "1000", "--tokenizer", src.parent / "tokenizer",
                "--executor", "inline", "--no-progress", *extra)
    assert r.code == 0, r.err
    report = json.loads((out / "shardfix-report.json").read_text())
    assert report["status"] == "complete"
    return report


def _verify(out: Path, src: Path) -> None:
    """What ``shardfix verify OUT --against SRC`` runs (in this process: a CLI start costs seconds here)."""
    problems, stats = verify_output(out, src)
    assert not problems, problems
    assert stats["compared"] == stats["tensors"] > 0


def _sidecars(report: dict) -> dict[str, dict]:
    return {s["name"]: s for s in report["outputs"]["sidecars"]}


@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_from_pretrained(hf_runs: Path, tmp_path: Path, variant: str) -> None:
    run, out = hf_runs / variant, tmp_path / "out"
    report = _cli_convert(run / "checkpoint", out)
    sides = _sidecars(report)
    assert sorted(sides) == sorted(["config.json", "generation_config.json", "optimizer_param_groups.json",
                                    *TOKENIZER_FILES])
    assert sides["config.json"]["changes"] == [{"key": "vocab_size", "from": 1024, "to": 1000, "because": "--vocab-size"}]
    assert all(len(s["checksum"]) == 32 and s["bytes"] == (out / s["name"]).stat().st_size for s in sides.values())
    head = next(e for e in report["ledger"] if e["source"] == "model.lm_head.weight")
    if variant == "tied":  # as save_pretrained writes it; the ledger says why
        assert head["fate"] == "dropped" and "tied to model.embed_tokens.weight" in head["reason"]
    else:
        assert head["outputs"] == ["lm_head.weight"]
    _verify(out, run / "checkpoint")

    model = check_model(out, torch.load(run / "reference.pt", weights_only=True))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (variant == "tied")
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(out)) == 1000


@pytest.mark.parametrize(("variant", "src", "given"), [("lora_dcp", "checkpoint", True),
                                                       ("lora_torchsave", "checkpoint.pt", False)])
def test_peft_adapter(hf_runs: Path, tmp_path: Path, variant: str, src: str, given: bool) -> None:
    run, out = hf_runs / variant, tmp_path / "out"
    extra: list[str | Path] = ["--trainable", "lora_"]  # the torch.save optimizer state is keyed by integer ids
    if given:
        cfg = tmp_path / "my_adapter_config.json"
        shutil.copyfile(run / "adapter_config.json", cfg)
        extra += ["--adapter-config", cfg]
    report = _cli_convert(run / src, out, *extra)
    assert _sidecars(report)["adapter/adapter_config.json"]["from"].startswith("--adapter-config" if given else str(run))
    assert (out / "adapter" / "adapter_config.json").read_bytes() == (run / "adapter_config.json").read_bytes()
    files = {f["name"]: f for f in report["outputs"]["files"]}
    assert len(files["adapter/adapter_model.safetensors"]["tensors"]) == 8  # lora_A, lora_B of q, v in 2 layers
    assert not [t for t in files["model.safetensors"]["tensors"] if "lora_" in t["name"] or "base_layer" in t["name"]]
    _verify(out, run / src)

    model = check_peft(out, torch.load(run / "reference.pt", weights_only=True))
    # the adapters' optimizer state is in optimizer.safetensors and restores into the PeftModel by name
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    result = shardfix.load_optimizer_state(opt, model, out, strict=True)
    assert len(result.loaded) == 8 and not result.missing


def _lora_copy(hf_runs: Path, tmp_path: Path, *, adapter_config: bool) -> Path:
    """The torch.save LoRA checkpoint with the training run's config.json, optionally its adapter config."""
    src = tmp_path / "run"
    src.mkdir()
    for name in ["checkpoint.pt", "config.json"] + (["adapter_config.json"] if adapter_config else []):
        shutil.copyfile(hf_runs / "lora_torchsave" / name, src / name)
    return src / "checkpoint.pt"


def test_lora_without_adapter_config_proposes_one(hf_runs: Path, tmp_path: Path) -> None:
    ckpt = _lora_copy(hf_runs, tmp_path, adapter_config=False)
    with pytest.raises(BadInputError) as e:
        convert(ckpt, tmp_path / "out", ConvertOptions(vocab_size=1000, executor="inline", progress=False))
    msg = str(e.value)
    assert '"r": 4' in msg and '"target_modules": ["q_proj", "v_proj"]' in msg and "lora_alpha" in msg
    assert "--adapter-config" in msg
    assert not (tmp_path / "out").exists()  # refused while planning


def test_config_conflicting_with_flag_is_exit_2(hf_runs: Path, tmp_path: Path) -> None:
    ckpt = _lora_copy(hf_runs, tmp_path, adapter_config=True)
    cfg = json.loads((ckpt.parent / "config.json").read_text())
    (ckpt.parent / "config.json").write_text(json.dumps({**cfg, "vocab_size": 1010}))
    with pytest.raises(BadInputError) as e:  # exit 2
        convert(ckpt, tmp_path / "out", ConvertOptions(vocab_size=1000, executor="inline", progress=False))
    assert f"{ckpt.parent / 'config.json'} (beside the source): vocab_size is 1010" in str(e.value)
    assert "--vocab-size gives 1000" in str(e.value)


def test_sidecars_never_replace_foreign_files_and_verify_checks_them(hf_runs: Path, tmp_path: Path) -> None:
    ckpt = _lora_copy(hf_runs, tmp_path, adapter_config=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}\n')
    opts = ConvertOptions(vocab_size=1000, trainable="lora_", executor="inline", progress=False, resume=True)
    with pytest.raises(OutputError, match="config.json not written by shardfix but this run would write a file of that name"):
        convert(ckpt, out, opts)
    assert (out / "config.json").read_text() == '{"mine": true}\n'
    assert not (out / "model.safetensors").exists()  # refused before anything was written
    assert not (out / ".shardfix-staging").exists()

    (out / "config.json").unlink()
    report = convert(ckpt, out, opts)
    assert report["status"] == "complete"
    problems, stats = verify_output(out, ckpt)
    assert problems == [] and stats["compared"] == 53
    (out / "adapter" / "adapter_config.json").write_text("{}")
    problems, _ = verify_output(out)
    assert problems == [f"{out}/adapter/adapter_config.json: 2 bytes, the report says "
                        f"{(ckpt.parent / 'adapter_config.json').stat().st_size}"]
