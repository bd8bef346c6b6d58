"""Client-side checks: load an output directory the way a fine-tuning job does, and compare with the truth.

Needs the ``test-hf`` extra (transformers, peft). Everything runs offline (``HF_HUB_OFFLINE=1``)
on CPU with one thread, the way the producers computed their reference logits.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from tests.conftest import bits_equal


def _no_key_problems(info: dict[str, Any], what: str) -> None:
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    assert not any(problems.values()), f"{what}: {problems}"


def _logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.eval()
        with torch.no_grad():
            return model(input_ids=input_ids).logits
    finally:
        torch.set_num_threads(threads)


def _same_logits(got: torch.Tensor, reference: dict[str, Any], what: str) -> None:
    vocab = reference["vocab"]
    want = reference["logits"][..., :vocab]
    assert got.shape == want.shape, f"{what}: logits {tuple(got.shape)}, reference {tuple(want.shape)}"
    diff = (got - want).abs().max().item()
    assert bits_equal(got.contiguous(), want.contiguous()), f"{what}: logits differ from the trained model's (max {diff})"


def load_model(out: Path) -> Any:
    """``AutoModelForCausalLM.from_pretrained(out)``, asserting no missing, unexpected or mismatched keys."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    _no_key_problems(info, f"from_pretrained({out})")
    return model


def check_model(out: Path, reference: dict[str, Any]) -> Any:
    """Load ``out`` with from_pretrained and compare its logits on the reference input, bit for bit."""
    model = load_model(out)
    assert model.config.vocab_size == reference["vocab"], f"{out}/config.json: vocab_size {model.config.vocab_size}"
    _same_logits(_logits(model, reference["input_ids"]), reference, f"from_pretrained({out})")
    return model


def check_peft(out: Path, reference: dict[str, Any], adapter: str = "adapter") -> Any:
    """``PeftModel.from_pretrained(from_pretrained(out), out/adapter)``: every adapter key fits, logits match.

    ``PeftModel.from_pretrained`` loads with ``strict=False`` and only warns about missing adapter
    keys (it says nothing of unexpected ones), so the warning is turned into a failure and the
    adapter file is loaded once more with ``set_peft_model_state_dict`` to see both lists.
    """
    from peft import PeftModel
    from peft.utils.save_and_load import set_peft_model_state_dict
    from safetensors.torch import load_file

    base = load_model(out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, out / adapter)
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    assert not missing, f"{out / adapter}: {missing}"
    result = set_peft_model_state_dict(model, load_file(out / adapter / "adapter_model.safetensors"))
    assert not result.unexpected_keys, f"{out / adapter}: unexpected {result.unexpected_keys}"
    assert not [k for k in result.missing_keys if ".lora_" in k], f"{out / adapter}: missing {result.missing_keys}"
    _same_logits(_logits(model, reference["input_ids"]), reference, f"PeftModel.from_pretrained({out / adapter})")
    return model
