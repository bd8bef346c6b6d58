"""Generators of formats that 2 gloo ranks write: DCP, torch's HF distributed writer, accelerate and
Lightning FSDP directories.

``dcp`` and ``hf-distributed`` save random DTensors with FSDP2's uneven dim-0 split through torch's own
``dcp.save`` (no training). ``accelerate`` and ``lightning-fsdp`` run the real producers of
``tests/producers/stacks.py`` -- the library's own FSDP wrapping, one real training step and its own
save code -- with the model scaled up (vocab 50304, width chosen for the size) and the test reference
(a gathered copy of everything) skipped.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

WORLD = 2
VOCAB = 50304


def dcp(work: Path, size: int) -> Path:
    """``shardfix.examples.synthetic``: model + AdamW moments as FSDP2 saves them."""
    from shardfix.examples.synthetic import make_checkpoint

    return make_checkpoint(work / "dcp", size)


def _hf_worker(rank: int, out: str, size: int, rdzv: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as tdcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from shardfix.examples.synthetic import _rows, shapes_for

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        gen = torch.Generator().manual_seed(rank)
        sd = {}
        for k, shape in shapes_for(3 * size).items():
            local = torch.empty((_rows(shape[0], rank, WORLD)[1], *shape[1:])).uniform_(-0.05, 0.05, generator=gen)
            sd[k] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                                       stride=torch.empty(shape, device="meta").stride())
        tdcp.save(sd, storage_writer=HuggingFaceStorageWriter(out, save_distributed=True))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def hf_distributed(work: Path, size: int) -> Path:
    """``HuggingFaceStorageWriter(save_distributed=True)``: each rank's rows of a model of ``size`` bytes."""
    out = work / "hfdist"
    out.mkdir()
    with tempfile.TemporaryDirectory(prefix="sfx-bench-") as tmp:
        mp.start_processes(_hf_worker, args=(str(out), size, os.path.join(tmp, "rdzv")), nprocs=WORLD, start_method="spawn")
    return out


def tiny_dim(size: int) -> int:
    """Width of ``stacks.Tiny(VOCAB, dim)`` (embed V x d, fc d x 23, head 23 x V) whose fp32 params + 2 moments fill ``size``."""
    return max(16, round(size / 12 / VOCAB) - 23)


def _scaled(st: object, dim: int) -> None:
    """Scale the producers' model in this process and skip their test reference (a gathered copy)."""
    st.Tiny.__init__.__defaults__ = (VOCAB, dim)  # type: ignore[attr-defined]
    st.STEPS = 1  # type: ignore[attr-defined]
    st.full_reference = lambda *a, **k: {"model": {}, "optim": {}}  # type: ignore[attr-defined]


def _stack_worker(rank: int, out: Path, kind: str, dim: int) -> None:
    import tests.producers.stacks as st

    _scaled(st, dim)
    {"accelerate": st._accelerate_fsdp, "lightning-fsdp": st._lightning_fsdp}[kind](rank, out)


def _stack(work: Path, size: int, kind: str) -> Path:
    import tests.producers.stacks as st

    out = work / kind
    out.mkdir()
    st.spawn(_stack_worker, out, kind, tiny_dim(size))
    (out / "reference.pt").unlink(missing_ok=True)
    return out / "ckpt"


def accelerate(work: Path, size: int) -> Path:
    """accelerate ``save_state`` with FSDP2 ``SHARDED_STATE_DICT`` (``pytorch_model_fsdp_0/`` + ``optimizer_0/``)."""
    return _stack(work, size, "accelerate")


def lightning_fsdp(work: Path, size: int) -> Path:
    """Lightning ``FSDPStrategy(state_dict_type="sharded")``: DCP files + ``meta.pt``."""
    return _stack(work, size, "lightning-fsdp")
