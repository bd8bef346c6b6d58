"""Real Hugging Face checkpoints for the client tests: tiny Llama models and a PEFT LoRA model.

Built offline from a config (``HF_HUB_OFFLINE=1``, nothing downloaded), on CPU, with the real
transformers and peft (the ``test-hf`` extra). :func:`make_all` writes, under ``out``:

* ``untied/`` and ``tied/``: a Llama-style model with grouped-query attention (4 heads, 2 kv
  heads) whose vocab 1000 is padded by ``resize_token_embeddings(1000, pad_to_multiple_of=128)``
  to 1024 rows, trained a few AdamW steps with FSDP2 on 2 gloo ranks and saved with
  ``dcp.save({"model": ..., "optim": ...})`` from ``get_state_dict`` into ``checkpoint/``. Beside
  it: the training job's ``config.json`` (which says 1024, as a Trainer checkpoint's does),
  ``generation_config.json`` and ``tokenizer/`` (1000 tokens, built with ``tokenizers``).
* ``lora_dcp/``: the same base (untied) wrapped with ``LoraConfig(r=4, lora_alpha=8,
  target_modules=["q_proj", "v_proj"])``, trained with FSDP2 on 2 ranks, saved with DCP;
  PEFT's own ``adapter_config.json`` beside it.
* ``lora_torchsave/``: the same LoRA model trained in one process and saved with
  ``torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()})`` as
  ``checkpoint.pt``; ``adapter_config.json`` beside it.

Each directory has ``reference.pt``: ``{"model": full state dict, "logits": logits on
``input_ids``, "input_ids": ..., "vocab": 1000}``, computed in the training process from the
trained weights (a plain, unsharded copy of the model, in eval mode, one thread).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

VOCAB = 1000
PAD_MULTIPLE = 128
STEPS = 2
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
ATTEMPTS = 3


def fixed_input() -> torch.Tensor:
    """The input every reference's logits are computed on: token ids below the true vocab."""
    return (torch.arange(24, dtype=torch.long).reshape(2, 12) * 37 + 5) % VOCAB


def tiny_config(tied: bool) -> Any:
    """A Llama config small enough for CPU tests: 2 layers, hidden 32, 4 heads, 2 kv heads."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=3)


def build_base(tied: bool, seed: int = 0) -> Any:
    """The base model with its vocab padded to 1024 rows; the same weights on every rank."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tied))
    model.resize_token_embeddings(VOCAB, pad_to_multiple_of=PAD_MULTIPLE)
    return model


def wrap_lora(model: Any) -> Any:
    """``get_peft_model`` with the tests' LoRA config."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(**LORA))


def _train(model: Any, optim: torch.optim.Optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(STEPS):
        tokens = torch.randint(0, VOCAB, (2, 16), generator=gen)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optim.step()
        optim.zero_grad()


def reference_logits(model: Any) -> torch.Tensor:
    """Logits of ``model`` on :func:`fixed_input`, in eval mode (what the client tests compare)."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=fixed_input()).logits


def write_sidecars(out: Path, config: Any) -> None:
    """The training job's ``config.json`` (padded vocab), ``generation_config.json``, ``tokenizer/``."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3, max_new_tokens=8).save_pretrained(out)
    write_tokenizer(out / "tokenizer")


def write_tokenizer(path: Path) -> Path:
    """A word-level ``tokenizer.json`` with exactly :data:`VOCAB` tokens, and its two small JSON files."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.save(str(path / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 64, **special}, indent=2))
    return path


def _full(model: Any, optim: torch.optim.Optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _fsdp_run(out: Path, rank: int, lora: bool, tied: bool) -> None:
    """Train one model with FSDP2 on the initialised process group and save it with DCP."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    model = build_base(tied)
    if lora:
        model = wrap_lora(model)
    for layer in (model.base_model.model if lora else model).model.layers:
        fully_shard(layer)
    fully_shard(model)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    _train(model, optim, seed=1234 + rank)
    msd, osd = get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(out / "checkpoint"))
    fmsd, _ = _full(model, optim)
    if rank == 0:
        plain = build_base(tied)
        if lora:
            plain = wrap_lora(plain)
        plain.load_state_dict(fmsd, strict=True)
        torch.save({"model": fmsd, "logits": reference_logits(plain), "input_ids": fixed_input(), "vocab": VOCAB},
                   out / "reference.pt")
        write_sidecars(out, plain.config if not lora else plain.base_model.model.config)
        if lora:
            plain.peft_config["default"].save_pretrained(str(out))
    dist.barrier()


def _worker(rank: int, world_size: int, out: str, rdzv: str) -> None:
    import torch.distributed as dist

    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world_size)
    try:
        for name, lora, tied in (("untied", False, False), ("tied", False, True), ("lora_dcp", True, False)):
            _fsdp_run(Path(out) / name, rank, lora, tied)
    finally:
        dist.destroy_process_group()


def make_lora_torchsave(out: Path) -> Path:
    """Train the LoRA model in this process and save it with ``torch.save`` (integer-id optimizer state)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = wrap_lora(build_base(tied=False))
        optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
        _train(model, optim, seed=99)
        torch.save({"model": model.state_dict(), "optimizer": optim.state_dict()}, out / "checkpoint.pt")
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save({"model": sd, "logits": reference_logits(model), "input_ids": fixed_input(), "vocab": VOCAB},
                   out / "reference.pt")
        write_sidecars(out, model.base_model.model.config)
        model.peft_config["default"].save_pretrained(str(out))
    finally:
        torch.set_num_threads(threads)
    return out


def make_fsdp(out: Path, world_size: int = 2) -> Path:
    """The three FSDP2 runs (untied, tied, lora_dcp) in one spawn of ``world_size`` gloo ranks."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    for attempt in range(1, ATTEMPTS + 1):
        out.mkdir(parents=True, exist_ok=True)
        try:
            with tempfile.TemporaryDirectory(prefix="sfx-rdzv-") as tmp:
                mp.start_processes(_worker, args=(world_size, str(out), os.path.join(tmp, "rdzv")),
                                   nprocs=world_size, start_method="spawn")
            return out
        except ProcessException as e:  # gloo teardown on a loaded machine; the run is deterministic
            if attempt == ATTEMPTS:
                raise
            print(f"hf_models: attempt {attempt} failed ({e}); retrying", file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
    raise AssertionError("unreachable")


def make_all(out: Path) -> Path:
    """Every checkpoint described in the module docstring, under ``out``."""
    make_fsdp(out)
    make_lora_torchsave(out / "lora_torchsave")
    return out


if __name__ == "__main__":
    print(make_all(Path(sys.argv[1])))
