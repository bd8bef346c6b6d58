"""Produce Megatron-core ``torch_dist`` checkpoints with the real library, on CPU with gloo.

A tiny GPTModel (2 layers, hidden 64, vocab 1000 padded to a multiple of 128 x TP) is trained for
two steps by ``world = tp * dp`` processes and saved with ``dist_checkpointing.save`` into
``OUT/iter_0000002/``, as Megatron's training loop does. Next to it, ``OUT/reference.safetensors``
holds what the training processes handed to the saver: every ShardedTensor's global tensor
(except the ``dp_reshardable`` flat buffers, which shardfix does not convert), assembled from each
rank's local box (stacked layers keep their leading ``[L]`` axis; the keys
are the checkpoint's own keys).

Megatron's training and save paths call a few CUDA-only functions. :func:`cpu_stand_ins`
replaces them, in this producer only, by CPU equivalents that do not change what is written:

* ``torch.cuda.synchronize`` -> no-op; ``torch.cuda.current_device`` -> ``"cpu"`` (used only as a
  ``device=`` argument for buffers and flags);
* ``device="cuda"`` in ``torch.tensor/zeros/empty/ones/empty_like/zeros_like`` -> CPU, and
  ``Tensor.cuda()`` -> the tensor itself;
* ``Tensor.type()`` (no argument) reports ``torch.cuda.*Tensor``: the distributed optimizer
  checks parameter types by that string;
* the CUDA RNG tracker's ``add``/``fork`` do nothing (dropout is 0 and initialisation happens on
  the CPU, ``use_cpu_initialization=True``).

The save path's async writer spawns processes that re-import this module: everything runs under
``if __name__ == "__main__"``.

Usage: ``python tests/producers/megatron_dist.py OUT --tp 2 --dp 1 [--per-layer] [--optim
fully_reshardable|dp_reshardable|none]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
from pathlib import Path
from typing import Any

import torch

VOCAB = 1000
HIDDEN = 64
LAYERS = 2
SEQ = 16
ITERATION = 2


def cpu_stand_ins() -> None:
    """Apply the CPU stand-ins listed in the module docstring (this process only)."""
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.empty_cache = lambda: None

    def cpu_device(fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            dev = kwargs.get("device")
            if dev is not None and "cuda" in str(dev):
                kwargs["device"] = "cpu"
            return fn(*args, **kwargs)

        return wrapped

    for name in ("tensor", "zeros", "empty", "ones", "empty_like", "zeros_like", "full"):
        setattr(torch, name, cpu_device(getattr(torch, name)))
    torch.Tensor.cuda = lambda self, *a, **k: self
    real_type = torch.Tensor.type

    def type_(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return real_type(self, *args, **kwargs)
        return real_type(self).replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = type_
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.CudaRNGStatesTracker.add = lambda self, name, seed: None
    mrandom.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()


def padded_vocab(tp: int) -> int:
    """Megatron's ``_vocab_size_with_padding``: a multiple of 128 x TP."""
    multiple = 128 * tp
    return (VOCAB + multiple - 1) // multiple * multiple


def _build(tp: int, optim: str) -> tuple[Any, Any]:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    cfg = TransformerConfig(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=4, use_cpu_initialization=True,
                            tensor_model_parallel_size=tp, hidden_dropout=0.0, attention_dropout=0.0,
                            params_dtype=torch.float32, bf16=False, fp16=False)
    model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=padded_vocab(tp), max_sequence_length=SEQ,
                     share_embeddings_and_output_weights=False)
    if optim == "none":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)
    ddp_cfg = DistributedDataParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=False,
                                            grad_reduce_in_fp32=False)
    model = DistributedDataParallel(cfg, ddp_cfg, model)
    opt_cfg = OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, use_distributed_optimizer=True,
                              bf16=False, fp16=False)
    return model, get_megatron_optimizer(opt_cfg, [model])


def _train(model: Any, opt: Any, rank_seed: int) -> None:
    g = torch.Generator().manual_seed(rank_seed)
    for _ in range(ITERATION):
        tokens = torch.randint(0, VOCAB, (2, SEQ), generator=g)
        pos = torch.arange(SEQ).unsqueeze(0).expand(2, -1)
        mask = torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool)).logical_not().view(1, 1, SEQ, SEQ)
        if hasattr(model, "zero_grad_buffer"):
            model.zero_grad_buffer()
        opt.zero_grad()
        loss = model(tokens, pos, mask, labels=torch.roll(tokens, -1, 1)).float().mean()
        loss.backward()
        if hasattr(model, "finish_grad_sync"):
            model.finish_grad_sync()
        opt.step()


def _local_boxes(sd: Any) -> list[tuple[str, tuple[int, ...], tuple[int, ...], torch.Tensor]]:
    """Every main-replica ShardedTensor of a sharded state dict as (key, global shape, offset, data)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = []
    for v in nested_values(sd):
        if not isinstance(v, ShardedTensor) or any(r != 0 for r in (v.replica_id if isinstance(v.replica_id, tuple)
                                                                      else (v.replica_id,))):
            continue
        data = v.data.detach().clone().cpu()
        if v.flattened_range is not None:
            raise SystemExit(f"{v.key}: flattened ShardedTensors are not produced by these settings")
        data = data.reshape((1,) * v.prepend_axis_num + tuple(data.shape))
        out.append((v.key, tuple(v.global_shape), tuple(v.global_offset), data))
    return out


def _write_reference(boxes: list[list[Any]], path: Path) -> None:
    from safetensors.torch import save_file

    full: dict[str, torch.Tensor] = {}
    for rank_boxes in boxes:
        for key, shape, offset, data in rank_boxes:
            if key.startswith("optimizer.distributed."):
                continue  # dp_reshardable flat buffers: rank-local bucket layout, not converted by shardfix
            t = full.setdefault(key, torch.full(shape, float("nan"), dtype=data.dtype) if data.is_floating_point()
                                else torch.zeros(shape, dtype=data.dtype))
            view = t
            for dim, (o, s) in enumerate(zip(offset, data.shape, strict=True)):
                view = view.narrow(dim, o, s)
            view.copy_(data)
    for key, t in full.items():
        if t.is_floating_point() and bool(torch.isnan(t).any()):
            raise SystemExit(f"reference {key}: some element was held by no rank")
    save_file({k: v.contiguous() for k, v in full.items()}, str(path))


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import faulthandler
    import sys
    faulthandler.dump_traceback_later(240, exit=True, file=sys.stderr)  # a hung collective fails, with stacks
    cpu_stand_ins()
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state

    dist.init_process_group("gloo", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp)
    model, opt = _build(args.tp, args.optim)
    _train(model, opt, 99 + parallel_state.get_data_parallel_rank())
    meta = {"non_homogeneous_layers": args.per_layer}
    if args.optim != "none":
        meta["distrib_optim_sharding_type"] = args.optim
    msd = model.sharded_state_dict(metadata=meta) if args.optim == "none" else model.module.sharded_state_dict(
        metadata=meta)
    sd: dict[str, Any] = {"model": msd, "iteration": ITERATION, "checkpoint_version": 3.0}
    if args.optim != "none":
        sd["optimizer"] = opt.sharded_state_dict(msd, metadata=meta)
    boxes = _local_boxes(sd)
    ckpt = Path(args.out) / f"iter_{ITERATION:07d}"
    if rank == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(sd, str(ckpt), sharded_strategy=("torch_dist", 1))
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, boxes)
    if rank == 0:
        _write_reference(gathered, Path(args.out) / "reference.safetensors")
        (Path(args.out) / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--per-layer", action="store_true", help="save non-homogeneous (per-layer) keys")
    ap.add_argument("--optim", default="none", choices=("none", "fully_reshardable", "dp_reshardable"))
    args = ap.parse_args(argv)
    world = args.tp * args.dp
    torch.multiprocessing.spawn(_worker, args=(world, _free_port(), args), nprocs=world, join=True)


if __name__ == "__main__":
    main()
