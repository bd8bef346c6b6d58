"""Make a real sharded checkpoint: a tiny language model trained for a few steps with FSDP2.

Two (or more) CPU processes on the gloo backend shard a small model with ``fully_shard``,
take a few AdamW steps and save ``{"model": ..., "optim": ...}`` from ``get_state_dict`` with
``torch.distributed.checkpoint.save``. Rank 0 also writes ``reference.pt``: the full
(unsharded) tensors exactly as the training process held them, so tests and the demo can
compare shardfix's output with the truth bit for bit.

The model carries the layouts shardfix must handle:

* ``embed.weight`` / ``lm_head.weight``: vocab padded to a multiple of 128 (1000 -> 1024);
  only token ids below the true vocab are used, so padded embedding rows never get gradient.
* ``scalars``: ``2 * layers + 1`` lambdas followed by ones, padded to a multiple of the world
  size (the modded-nanogpt convention).
* ``router.weight`` [131, d]: uneven FSDP2 rows (66 + 65).
* ``gate`` [1, d]: one row over two ranks, so rank 1 holds a 0-size chunk.
* ``blocks.1``: bf16 parameters (its own FSDP group); the rest is fp32.
* ``pos_scale``: a persistent buffer (replicated, stored once).

Run: ``python -m shardfix.examples.fsdp_train OUT [--world-size 2] [--vocab 1000]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.multiprocessing.spawn import ProcessException

PAD_MULTIPLE = 128
ATTEMPTS = 3


def padded(n: int, multiple: int) -> int:
    """Round ``n`` up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


class Block(nn.Module):
    """A pre-norm attention-free block: enough parameters to be realistic, cheap on CPU."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.fc = nn.Linear(dim, 4 * dim, bias=True)
        self.out = nn.Linear(4 * dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x.to(self.qkv.weight.dtype))
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        h = self.proj(torch.sigmoid(q * k) * v)
        h = self.out(torch.relu(self.fc(h)))
        return x + h.to(x.dtype)


class TinyLM(nn.Module):
    """Tiny LM with a padded vocab, a world-size padded ``scalars`` vector and odd shapes."""

    def __init__(
        self,
        vocab: int = 1000,
        dim: int = 32,
        layers: int = 2,
        world_size: int = 2,
        pad_vocab: bool = True,
        pad_scalars: bool = True,
    ) -> None:
        super().__init__()
        rows = padded(vocab, PAD_MULTIPLE) if pad_vocab else vocab
        content = 2 * layers + 1
        pad = (-content) % world_size if pad_scalars else 0
        self.embed = nn.Embedding(rows, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))
        self.router = nn.Linear(dim, 131, bias=True)
        self.gate = nn.Parameter(torch.randn(1, dim) * 0.1)
        self.scalars = nn.Parameter(torch.cat([torch.linspace(0.5, 1.5, content), torch.ones(pad)]))
        self.lm_head = nn.Linear(dim, rows, bias=False)
        self.register_buffer("pos_scale", torch.linspace(1.0, 2.0, dim))
        self.layers = layers

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) * self.pos_scale
        for i, block in enumerate(self.blocks):
            x = block(x) * self.scalars[2 * i] + x * self.scalars[2 * i + 1]
        x = x + torch.tanh(self.router(x)).mean(-1, keepdim=True) * self.gate
        return self.lm_head(x * self.scalars[2 * self.layers])


def build_model(vocab: int, world_size: int, seed: int = 0, bf16_block: bool = True) -> TinyLM:
    """Build the model deterministically (same weights on every rank)."""
    torch.manual_seed(seed)
    model = TinyLM(vocab=vocab, world_size=world_size)
    if bf16_block and len(model.blocks) > 1:
        model.blocks[1].to(torch.bfloat16)
    return model


def _worker(rank: int, world_size: int, out: str, vocab: int, steps: int, rdzv: str) -> None:
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world_size)
    try:
        model = build_model(vocab, world_size)
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        scalars = [p for n, p in model.named_parameters() if n == "scalars"]
        rest = [p for n, p in model.named_parameters() if n != "scalars"]
        # two groups, as modded-nanogpt has: no weight decay on the scalars
        optim = torch.optim.AdamW(
            [{"params": rest, "weight_decay": 0.01}, {"params": scalars, "weight_decay": 0.0}], lr=1e-2
        )
        gen = torch.Generator().manual_seed(1234 + rank)
        for _ in range(steps):
            tokens = torch.randint(0, vocab, (4, 16), generator=gen)
            logits = model(tokens)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.roll(-1, 1).flatten())
            loss.backward()
            optim.step()
            optim.zero_grad()
        msd, osd = get_state_dict(model, optim)
        save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(out, "checkpoint"))
        # the same state saved without collectives: one __{rank}.metadata per rank, no .metadata
        save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(out, "checkpoint_nocoll"), use_collectives=False)
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        fmsd, fosd = get_state_dict(model, optim, options=full)
        if rank == 0:
            torch.save({"model": fmsd, "optim": fosd, "vocab": vocab}, os.path.join(out, "reference.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def make_checkpoint(out: str | os.PathLike[str], world_size: int = 2, vocab: int = 1000, steps: int = 2) -> Path:
    """Train TinyLM with FSDP2 and save a DCP checkpoint to ``out/checkpoint``.

    Returns:
        The checkpoint directory. ``out/reference.pt`` holds the full tensors, and
        ``out/checkpoint_nocoll`` the same state saved with ``use_collectives=False`` (per-rank
        ``__N.metadata`` files instead of one ``.metadata``).
    """
    out = Path(out)
    for attempt in range(1, ATTEMPTS + 1):
        out.mkdir(parents=True, exist_ok=True)
        try:
            with tempfile.TemporaryDirectory(prefix="sfx-rdzv-") as tmp:
                rdzv = os.path.join(tmp, "rdzv")
                mp.start_processes(
                    _worker, args=(world_size, str(out), vocab, steps, rdzv), nprocs=world_size, start_method="spawn"
                )
            return out / "checkpoint"
        except ProcessException as e:
            # gloo on a loaded machine occasionally aborts a rank at teardown ("terminate called
            # without an active exception"); the run is deterministic, so start it again cleanly
            if attempt == ATTEMPTS:
                raise
            print(f"fsdp_train: attempt {attempt} failed ({e}); retrying", file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="directory to write checkpoint/ and reference.pt into")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1000, help="true vocab; the model pads it to 128")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    path = make_checkpoint(args.out, args.world_size, args.vocab, args.steps)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
