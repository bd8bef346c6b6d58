"""Generators of one-process formats, written with the real library's own save calls on random tensors.

Shapes are the synthetic GPT-like model of ``shardfix.examples.synthetic`` (vocab padded to 50304).
``torch-save`` and ``torch-ranks`` hold the model plus AdamW moments (``size`` bytes in all);
``safetensors`` holds a model of ``size`` bytes. No training: at these sizes it would take hours
on a CPU, and the formats' bytes do not depend on the values.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORLD = 2


def _tensors(shapes: dict[str, tuple[int, ...]], seed: int, positive: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.empty(s).uniform_(0.0 if positive else -0.05, 0.05, generator=gen) for k, s in shapes.items()}


def _adamw(size: int) -> tuple[dict[str, torch.Tensor], dict]:
    """A model and a real ``torch.optim.AdamW(named_parameters).state_dict()`` (integer ids, param_names)."""
    from shardfix.examples.synthetic import shapes_for

    shapes = shapes_for(size)
    model = _tensors(shapes, 0)
    params = {k: torch.nn.Parameter(v) for k, v in model.items()}
    opt = torch.optim.AdamW(list(params.items()), lr=3e-4, weight_decay=0.1)
    avg, sq = _tensors(shapes, 1), _tensors(shapes, 2, positive=True)
    for k, p in params.items():  # what one step leaves, without computing one
        opt.state[p] = {"step": torch.tensor(100.0), "exp_avg": avg[k], "exp_avg_sq": sq[k]}
    return model, opt.state_dict()


def torch_save(work: Path, size: int) -> Path:
    """One ``torch.save({"model", "optimizer"})`` file."""
    model, optim = _adamw(size)
    path = work / "ckpt.pt"
    torch.save({"model": model, "optimizer": optim, "step": 100}, path)
    return path


def torch_ranks(work: Path, size: int) -> Path:
    """``rank_{r}.pt`` per rank: each rank's dim-0 rows of every moment (ZeRO-1 / DistAdam style), model on rank 0."""
    model, optim = _adamw(size)
    src = work / "ranks"
    src.mkdir()
    for r in range(WORLD):
        state = {}
        for i, st in optim["state"].items():
            n = st["exp_avg"].shape[0] // WORLD
            state[i] = {"step": st["step"], **{k: st[k][r * n:(r + 1) * n].clone() for k in ("exp_avg", "exp_avg_sq")}}
        doc: dict = {"step": 100, "world_size": WORLD, "optimizer": {"state": state, "param_groups": optim["param_groups"]}}
        if r == 0:
            doc["model"] = model
        torch.save(doc, src / f"rank_{r}.pt")
    return src


def safetensors_dir(work: Path, size: int) -> Path:
    """A Hugging Face sharded directory (``model-0000i-of-0000n.safetensors`` + index) by
    ``huggingface_hub.save_torch_state_dict``, about four shards."""
    from huggingface_hub import save_torch_state_dict

    from shardfix.examples.synthetic import shapes_for

    model = _tensors(shapes_for(3 * size), 0)
    src = work / "hf"
    src.mkdir()
    save_torch_state_dict(model, src, max_shard_size=max(size // 4, 1 << 20))
    return src
