"""Write the directories training stacks leave behind, with the real libraries, on CPU.

Run ``python -m tests.producers.stacks KIND OUT``; KIND is one of :data:`PRODUCERS`. Every
producer trains a tiny model for a few steps, saves the way its library does (into
``OUT/ckpt``) and writes ``OUT/reference.pt``: what the training process held, as
``{"model": {name: tensor}, "optim": {name: {state: tensor}}, "facts": {...}}`` -- every moment
under its parameter name. Distributed producers run 2 ranks on gloo and take the reference
from ``get_state_dict(..., full_state_dict=True)``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2
STEPS = 3


class Tiny(nn.Module):
    """Embedding, an uneven-rows linear (23 rows: 12 + 11 over 2 ranks), a norm and a head."""

    def __init__(self, vocab: int = 64, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, 23)
        self.norm = nn.LayerNorm(23)
        self.head = nn.Linear(23, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.relu(self.fc(self.embed(tokens)))))


def loss_of(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
    tokens = torch.randint(0, 64, (2, 8), generator=gen)
    return nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten())


def named_state(model: nn.Module, optim: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer's per-parameter state keyed by parameter name (single process)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in optim.state.items()}


def group_order_names(model: nn.Module, optim: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order (groups in turn): what ``--param-names`` takes."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optim.param_groups for p in g["params"]]


def save_single(out: Path, model: nn.Module, optim: torch.optim.Optimizer, facts: dict) -> None:
    """Reference and ``param_names.json`` of a one-process run (integer-id optimizer state)."""
    torch.save({"model": dict(model.state_dict()), "optim": named_state(model, optim), "facts": facts}, out / "reference.pt")
    (out / "param_names.json").write_text(json.dumps(group_order_names(model, optim)))


def full_reference(model: nn.Module, optim: torch.optim.Optimizer, cpu_offload: bool = True) -> dict:
    """What a distributed training process holds, gathered: ``get_state_dict(full_state_dict=True)``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload))
    return {"model": dict(msd), "optim": {k: dict(v) for k, v in osd.get("state", {}).items()}}


def spawn(worker: Callable[..., None], out: Path, *args: object) -> None:
    """Run ``worker(rank, out, *args)`` on :data:`WORLD` gloo ranks."""
    with tempfile.TemporaryDirectory(prefix="sfx-stacks-") as tmp:
        mp.start_processes(_entry, args=(worker, str(out), os.path.join(tmp, "rdzv"), args), nprocs=WORLD,
                           start_method="spawn")


def _entry(rank: int, worker: Callable[..., None], out: str, rdzv: str, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("SFX_PORT", "29531"))
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=WORLD)
    try:
        worker(rank, Path(out), *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# -- torch HuggingFaceStorageWriter --------------------------------------------------------------


def _hf_writer(rank: int, out: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Tiny()
    fully_shard(model)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        loss_of(model, gen).backward()
        optim.step()
        optim.zero_grad()
    msd = model.state_dict()  # DTensors: each rank writes its own rows
    dcp.save(msd, storage_writer=HuggingFaceStorageWriter(str(out / "ckpt"), save_distributed=True))
    ref = full_reference(model, optim)
    if rank == 0:
        torch.save({"model": ref["model"], "optim": {}, "facts": {}}, out / "reference.pt")


def hf_writer(out: Path) -> None:
    """torch's own HF writer, every rank saving its rows (model only: the writer takes a flat dict)."""
    spawn(_hf_writer, out)


# -- Lightning ---------------------------------------------------------------------------------


def _lightning_module():  # imported lazily: the producers of other stacks do not need Lightning
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = Tiny()
            self.gen = torch.Generator().manual_seed(int(os.environ.get("RANK", "0")))

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return loss_of(self.model, self.gen)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

        def train_dataloader(self) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(torch.zeros(16, 1), batch_size=1)

    return Module()


def _lightning_trainer(**kw: object):
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="cpu", max_steps=STEPS, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kw)


def lightning_ckpt(out: Path) -> None:
    """Lightning's single-file ``.ckpt`` (one process)."""
    module = _lightning_module()
    trainer = _lightning_trainer(devices=1)
    trainer.fit(module)
    (out / "ckpt").mkdir(exist_ok=True)
    trainer.save_checkpoint(out / "ckpt" / "last.ckpt")
    save_single(out, module, trainer.optimizers[0], {"global_step": trainer.global_step})


def _lightning_fsdp(rank: int, out: Path) -> None:
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    class CpuFSDPStrategy(FSDPStrategy):
        """Lightning refuses FSDP on CPU by an exact-type check (``type(strategy) is FSDPStrategy`` in its
        accelerator connector); a subclass passes it. FSDP then needs ``device_id=cpu`` to wrap on CPU,
        which Lightning would pass as the (absent) CUDA index. Saving is Lightning's own code, untouched."""

        def _setup_model(self, model: nn.Module) -> nn.Module:
            return FullyShardedDataParallel(module=model, device_id=torch.device("cpu"), **self.kwargs)

    module = _lightning_module()
    trainer = _lightning_trainer(devices=WORLD, strategy=CpuFSDPStrategy(state_dict_type="sharded"))
    trainer.fit(module)
    trainer.save_checkpoint(out / "ckpt")
    ref = full_reference(trainer.strategy.model, trainer.optimizers[0], cpu_offload=False)
    if rank == 0:
        torch.save({**ref, "facts": {"global_step": trainer.global_step}}, out / "reference.pt")


def lightning_fsdp(out: Path) -> None:
    """Lightning ``FSDPStrategy(state_dict_type="sharded")`` on 2 gloo ranks."""
    spawn(_lightning_fsdp, out)


# -- accelerate --------------------------------------------------------------------------------


def _accelerate_train(acc, model: nn.Module, optim: torch.optim.Optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        acc.backward(loss_of(model, gen))
        optim.step()
        optim.zero_grad()


def _accelerate_fsdp(rank: int, out: Path) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    acc = Accelerator(cpu=True, fsdp_plugin=plugin)
    # accelerate drops the FSDP plugin when it runs on CPU processes (MULTI_CPU is not in the branch that
    # enables FSDP); forcing the type runs its own FSDP2 prepare (fully_shard) and save_state code, so the
    # files are those it writes on GPUs
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    torch.manual_seed(0)
    model = Tiny()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=1)
    model, optim, sched = acc.prepare(model, optim, sched)
    _accelerate_train(acc, model, optim, rank)
    acc.state.distributed_type = DistributedType.FSDP  # the CPU state object resets it on the way: force it again
    acc.save_state(str(out / "ckpt"))
    ref = full_reference(model, optim.optimizer, cpu_offload=False)
    if rank == 0:
        torch.save({**ref, "facts": {}}, out / "reference.pt")


def accelerate_fsdp(out: Path) -> None:
    """accelerate ``save_state`` with FSDP2 ``SHARDED_STATE_DICT`` on 2 gloo ranks."""
    spawn(_accelerate_fsdp, out)


def accelerate_ddp(out: Path) -> None:
    """accelerate ``save_state`` without FSDP (one process; DDP writes the same files from rank 0)."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = Tiny()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=1)
    model, optim, sched = acc.prepare(model, optim, sched)
    _accelerate_train(acc, model, optim, 0)
    acc.save_state(str(out / "ckpt"))
    save_single(out, model, optim.optimizer, {})


# -- transformers Trainer ----------------------------------------------------------------------


class _Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


def _trainer_run(out: Path, shard: bool) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import functools

    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    if shard:  # the Trainer has no shard-size option: give save_pretrained a tiny default (its own sharding code)
        model.save_pretrained = functools.partial(model.save_pretrained, max_shard_size="8KB")
    args = TrainingArguments(output_dir=str(out / "run"), max_steps=STEPS, save_steps=STEPS, per_device_train_batch_size=2,
                             learning_rate=1e-2, weight_decay=0.01, use_cpu=True, report_to=[], logging_steps=1,
                             dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens())
    trainer.train()
    os.replace(out / "run" / f"checkpoint-{STEPS}", out / "ckpt")
    optim = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    save_single(out, model, optim, {"global_step": trainer.state.global_step})


def trainer_single(out: Path) -> None:
    """Trainer ``checkpoint-N/`` with one ``model.safetensors``."""
    _trainer_run(out, shard=False)


def trainer_sharded(out: Path) -> None:
    """Trainer ``checkpoint-N/`` with ``model-0000i-of-0000n.safetensors`` + index."""
    _trainer_run(out, shard=True)


PRODUCERS: dict[str, Callable[[Path], None]] = {"hf-writer": hf_writer, "lightning-ckpt": lightning_ckpt,
                                                 "lightning-fsdp": lightning_fsdp, "accelerate-fsdp": accelerate_fsdp,
                                                 "accelerate-ddp": accelerate_ddp, "trainer": trainer_single,
                                                 "trainer-sharded": trainer_sharded}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in PRODUCERS:
        print(f"usage: python -m tests.producers.stacks {{{'|'.join(PRODUCERS)}}} OUT", file=sys.stderr)
        return 2
    out = Path(args[1])
    out.mkdir(parents=True, exist_ok=True)
    PRODUCERS[args[0]](out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
