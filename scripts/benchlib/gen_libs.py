"""Generators that run the training library itself: DeepSpeed ZeRO-3, Megatron-core torch_dist, Trainer.

Each trains a model scaled to the size for one or two real steps on CPU and saves with the library's
own checkpoint code, so the files are exactly what the library writes:

* ``deepspeed``: 2 ranks (gloo, ``DS_ACCELERATOR=cpu``), ZeRO stage 3, a torch AdamW client optimizer,
  ``engine.save_checkpoint``; the model is an embedding, two square linears and a head;
* ``megatron``: ``tests/producers/megatron_dist.py`` (TP 2, distributed optimizer, ``fully_reshardable``)
  with a wider hidden size, its test reference skipped;
* ``trainer``: ``transformers.Trainer`` on a Llama model (``checkpoint-1/``), one step.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 50304


def _square_dim(size: int, bytes_per_param: int, a: float, b: float, multiple: int) -> int:
    """Smallest-error d (a multiple of ``multiple``) with a*d^2 + b*d parameters filling ``size``."""
    params = size / bytes_per_param
    d = (-b + math.sqrt(b * b + 4 * a * params)) / (2 * a)
    return max(multiple, round(d / multiple) * multiple)


# -- DeepSpeed ZeRO-3 ----------------------------------------------------------------------------


def _ds_rank(out: Path, dim: int) -> None:
    import deepspeed
    from torch import nn

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, dim), nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim),
                          nn.Linear(dim, VOCAB, bias=False))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
              "zero_allow_untested_optimizer": True, "steps_per_print": 1000}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    ids = torch.randint(0, VOCAB, (1, 4))
    engine.backward(engine(ids).float().pow(2).mean())
    engine.step()
    engine.save_checkpoint(str(out))


def deepspeed(work: Path, size: int) -> Path:
    """ZeRO-3 checkpoint root (``latest`` + ``global_step1/``): fp32 master partitions + moments."""
    out = work / "zero3"
    dim = _square_dim(size, 12, 2, 2 * VOCAB + 2, 16)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29600 + os.getpid() % 300), "WORLD_SIZE": "2",
           "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "scripts")])}
    code = f"from benchlib.gen_libs import _ds_rank; from pathlib import Path; _ds_rank(Path({str(out)!r}), {dim})"
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=1200)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("deepspeed ranks failed:\n" + "\n----\n".join(log[-3000:] for log in logs))
    return out


# -- Megatron-core torch_dist --------------------------------------------------------------------


def _mega_worker(rank: int, world: int, port: int, args: Any, hidden: int) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "producers"))
    import megatron_dist as m  # the producer as a plain module: its worker re-imports it by this name

    m.HIDDEN = hidden
    m._local_boxes = lambda sd: []  # the test reference (a gathered copy) is not needed here
    m._write_reference = lambda boxes, path: None
    m._worker(rank, world, port, args)


def megatron(work: Path, size: int) -> Path:
    """``iter_0000002/`` of a TP-2 GPTModel (2 layers) with the distributed optimizer (fully_reshardable)."""
    import argparse

    sys.path.insert(0, str(ROOT / "tests" / "producers"))
    import megatron_dist as m

    out = work / "megatron"
    # params ~ 2 layers x 12 h^2 + 2 x 1024 x h; saved: model + main param + 2 moments, fp32
    hidden = _square_dim(size, 16, 2 * 12, 2 * m.padded_vocab(2), 64)
    args = argparse.Namespace(out=str(out), tp=2, dp=1, per_layer=False, optim="fully_reshardable")
    torch.multiprocessing.spawn(_mega_worker, args=(2, m._free_port(), args, hidden), nprocs=2, join=True)
    return out / f"iter_{m.ITERATION:07d}"


# -- transformers Trainer ------------------------------------------------------------------------


def trainer(work: Path, size: int) -> Path:
    """``checkpoint-1/`` of a Llama (4 layers, untied head) trained one step by ``Trainer``; writes
    ``param_names.json`` beside it (the Trainer's optimizer records no names)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    sys.path.insert(0, str(ROOT))
    from tests.producers.stacks import _Tokens, group_order_names

    layers = 4  # params ~ 2 V h + layers (4 h^2 + 3 h 4h) = 2Vh + 64 h^2
    hidden = _square_dim(size, 12, layers * 16, 2 * VOCAB, 64)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=32,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    args = TrainingArguments(output_dir=str(work / "run"), max_steps=1, save_steps=1, per_device_train_batch_size=1,
                             learning_rate=1e-4, use_cpu=True, report_to=[], dataloader_num_workers=0, seed=0,
                             disable_tqdm=True)
    tr = Trainer(model=model, args=args, train_dataset=_Tokens())
    tr.train()
    ckpt = work / "run" / "checkpoint-1"
    optim = getattr(tr.optimizer, "optimizer", tr.optimizer)
    assert optim is not None, "the Trainer built no optimizer"
    (work / "param_names.json").write_text(json.dumps(group_order_names(model, optim)))
    return ckpt
