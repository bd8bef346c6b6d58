"""A tied-embedding Llama trained with FSDP2 on 2 gloo ranks, saved with DCP, plus one more step's reference.

Run ``python -m tests.producers.tied_step OUT``. Builds the ``tied`` model of
:mod:`tests.producers.hf_models` (``tie_word_embeddings=True``, vocab 1000 padded to 1024),
trains it a few AdamW steps with ``fully_shard`` on 2 ranks and saves ``dcp.save({"model": ...,
"optim": ...})`` from ``get_state_dict`` into ``OUT/checkpoint`` (DCP keys the tied matrix's
optimizer state by its first name, ``model.embed_tokens.weight``). Rank 0 then continues the
training process's full state (``get_state_dict(full_state_dict=True)``) in a plain model: it
loads the weights and the optimizer state (by the training process's own FQNs), takes one
more AdamW step on :func:`step_batch` and writes ``OUT/reference.pt``: ``{"model": full state
dict, "optim": {fqn: {state: tensor}}, "after_step": {name: parameter after the step}}``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from tests.producers.hf_models import STEPS, VOCAB, build_base, write_sidecars

LR, WD = 1e-2, 0.01


def step_batch() -> torch.Tensor:
    """The batch of the extra step (token ids below the true vocab)."""
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(777))


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)


def one_step(model: Any, optim: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """One AdamW step on :func:`step_batch`; the parameters after it, by name."""
    model.train()
    tokens = step_batch()
    model(input_ids=tokens, labels=tokens).loss.backward()
    optim.step()
    optim.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _continue(full_model: dict, full_optim: dict) -> dict[str, torch.Tensor]:
    """The training process's state continued one step in a plain tied model (torch's own state format)."""
    plain = build_base(tied=True)
    plain.load_state_dict(full_model, strict=False)
    optim = adamw(plain)
    names = [n for n, _ in plain.named_parameters()]  # the tied matrix once, by its first name
    sd = optim.state_dict()
    sd["state"] = {i: {k: v.clone() for k, v in full_optim[n].items()} for i, n in enumerate(names)}
    optim.load_state_dict(sd)
    return one_step(plain, optim)


def _worker(rank: int, out: str, rdzv: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.fsdp import fully_shard

    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=2)
    try:
        model = build_base(tied=True)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        optim = adamw(model)
        gen = torch.Generator().manual_seed(1234 + rank)
        for _ in range(STEPS):
            tokens = torch.randint(0, VOCAB, (2, 16), generator=gen)
            model(input_ids=tokens, labels=tokens).loss.backward()
            optim.step()
            optim.zero_grad()
        msd, osd = get_state_dict(model, optim)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(out, "checkpoint"))
        fmsd, fosd = get_state_dict(model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            full_optim = {k: dict(v) for k, v in fosd["state"].items()}
            torch.save({"model": dict(fmsd), "optim": full_optim, "after_step": _continue(dict(fmsd), full_optim)},
                       os.path.join(out, "reference.pt"))
            write_sidecars(Path(out), build_base(tied=True).config)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def make(out: Path) -> Path:
    import torch.multiprocessing as mp

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sfx-tied-") as tmp:
        mp.start_processes(_worker, args=(str(out), os.path.join(tmp, "rdzv")), nprocs=2, start_method="spawn")
    return out


if __name__ == "__main__":
    print(make(Path(sys.argv[1])))
