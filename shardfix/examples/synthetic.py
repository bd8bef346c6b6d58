"""Make a real DCP checkpoint of a given size quickly: a GPT-like model plus AdamW moments.

Used by ``scripts/bench`` (0.25-4 GB) and by tests (tiny sizes, other shard layouts). Two gloo
ranks save ``{"model": ..., "optim": {"state": ..., "param_groups": ...}}`` -- the structure
``get_state_dict`` returns under FSDP2 -- with every parameter and moment a ``DTensor`` sharded
with FSDP2's (uneven) split, on dim 0 by default, so the files hold one record per rank per
tensor exactly as an FSDP2 run leaves them (``shard_dim=1`` gives column shards, as tensor
parallelism does). No training happens (it would take hours on a CPU at these sizes); values
are random. The vocab is padded to a multiple of 128 (50257 -> 50304) as training frameworks do.

Run: ``python -m shardfix.examples.synthetic OUT --size 1GB``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

VOCAB = 50257
PAD = 128
PADDED_VOCAB = -(-VOCAB // PAD) * PAD


def shapes_for(size_bytes: int, layers: int = 8) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a GPT-like model whose fp32 params + 2 fp32 moments fill ``size_bytes``."""
    params = size_bytes / 12
    # 2 * V * d (embed + head) + layers * (12 d^2 + 7 d) + d = params
    a, b = layers * 12, 2 * PADDED_VOCAB + layers * 7 + 1
    dim = max(16, round((-b + math.sqrt(b * b + 4 * a * params)) / (2 * a) / 16) * 16)
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (PADDED_VOCAB, dim)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes |= {
            p + "attn_norm.weight": (dim,),
            p + "attn.qkv.weight": (3 * dim, dim),
            p + "attn.proj.weight": (dim, dim),
            p + "mlp_norm.weight": (dim,),
            p + "mlp.fc.weight": (4 * dim, dim),
            p + "mlp.fc.bias": (4 * dim,),
            p + "mlp.out.weight": (dim, 4 * dim),
            p + "mlp.out.bias": (dim,),
        }
    shapes["norm.weight"] = (dim,)
    shapes["lm_head.weight"] = (PADDED_VOCAB, dim)
    return shapes


def _rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """FSDP2's split (torch.chunk): ceil-sized pieces, the last ones shorter or empty."""
    per = -(-n // world)
    start = min(rank * per, n)
    return start, min(per, n - start)


def _worker(rank: int, world: int, out: str, size_bytes: int, shard_dim: int, rdzv: str) -> None:
    from torch.distributed.checkpoint import save
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        gen = torch.Generator().manual_seed(1000 + rank)

        def shard(shape: tuple[int, ...], positive: bool = False) -> DTensor:
            dim = shard_dim if shard_dim < len(shape) else 0
            local_shape = list(shape)
            local_shape[dim] = _rows(shape[dim], rank, world)[1]
            local = torch.empty(local_shape, dtype=torch.float32)
            local.uniform_(0.0 if positive else -0.05, 0.05, generator=gen)
            stride = torch.empty(shape, device="meta").stride()
            return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape), stride=stride)

        shapes = shapes_for(size_bytes)
        model = {k: shard(s) for k, s in shapes.items()}
        state = {k: {"step": torch.tensor(100.0), "exp_avg": shard(s), "exp_avg_sq": shard(s, True)} for k, s in shapes.items()}
        group = {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "amsgrad": False,
                 "foreach": None, "maximize": False, "capturable": False, "differentiable": False,
                 "fused": None, "params": list(shapes)}
        save({"model": model, "optim": {"state": state, "param_groups": [group]}}, checkpoint_id=out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def make_checkpoint(out: str | os.PathLike[str], size_bytes: int, world: int = 2, shard_dim: int = 0) -> Path:
    """Write a DCP checkpoint of about ``size_bytes`` into ``out``; return ``out``.

    Args:
        out: the checkpoint directory (created).
        size_bytes: model + moments, fp32 (the model is a third of it).
        world: ranks, each saving its shard of every tensor.
        shard_dim: the dimension tensors are split on (1-d tensors always on dim 0).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sfx-rdzv-") as tmp:
        mp.start_processes(_worker, args=(world, str(out), size_bytes, shard_dim, os.path.join(tmp, "rdzv")),
                           nprocs=world, start_method="spawn")
    return out


def main(argv: list[str] | None = None) -> int:
    from shardfix.options import parse_size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="checkpoint directory to write")
    parser.add_argument("--size", default="1GB", help="model + moments (default 1GB)")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--shard-dim", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_checkpoint(args.out, parse_size(args.size, "--size"), args.world_size, args.shard_dim))
    return 0


if __name__ == "__main__":
    sys.exit(main())
