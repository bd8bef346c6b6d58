"""Produce real DeepSpeed ZeRO checkpoints (stages 1, 2, 3 and ZeRO-2 with bf16) on 2 CPU ranks.

Two worker processes (gloo, ``DS_ACCELERATOR=cpu``) train one tiny model per variant for a few
steps with a torch AdamW client optimizer in two param groups, call ``engine.save_checkpoint``,
and write ``reference.safetensors`` next to the checkpoint from what the training processes held
(gathered on every rank, saved by rank 0):

* ``model.<name>``: ``deepspeed.utils.safe_get_full_fp32_param`` for each trainable parameter
  (the fp32 master), the value itself for frozen parameters and buffers;
* ``state.<name>.exp_avg`` / ``state.<name>.exp_avg_sq``: ``safe_get_full_optimizer_state``;
* ``step``: the optimizer's step count (a 0-d tensor).

The model has an embedding, two linear layers, a frozen linear layer, a buffer, and an odd-sized
vector (``scale``, 7 elements) so groups need alignment padding; the worker asserts that some
parameter straddles the two ranks' partitions. Names carry DeepSpeed's ``module.`` prefix in the
checkpoint but not in the reference (shardfix strips it).

Run: ``python -m tests.producers.deepspeed_zero OUT_DIR`` (writes ``OUT_DIR/<variant>/``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

VARIANTS: dict[str, dict] = {
    "zero1": {"stage": 1, "bf16": False},
    "zero2": {"stage": 2, "bf16": False},
    "zero3": {"stage": 3, "bf16": False},
    "zero2_bf16": {"stage": 2, "bf16": True},
}
WORLD_SIZE = 2
STEPS = 2
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_checkpoints(out: Path, variants: list[str] | None = None, timeout: float = 300) -> dict[str, Path]:
    """Train and save each variant under ``out/<variant>/`` (checkpoint root with ``latest``).

    Returns:
        The checkpoint root of each variant; ``<root>/reference.safetensors`` holds the reference.
    """
    names = variants or list(VARIANTS)
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env_base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(WORLD_SIZE),
                "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in range(WORLD_SIZE):
        env = {**env_base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.producers.deepspeed_zero", "--worker", str(out), *names],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    if any(p.returncode for p in procs):
        raise RuntimeError("deepspeed workers failed:\n" + "\n----\n".join(log[-4000:] for log in logs))
    return {n: out / n for n in names}


# -- worker (imports torch and deepspeed only here) ---------------------------------------------


def _model():  # noqa: ANN202 - torch types are imported lazily
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(11, 6)
            self.fc1 = nn.Linear(6, 5)
            self.frozen = nn.Linear(5, 3, bias=False)
            self.frozen.weight.requires_grad_(False)
            self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 7))
            self.head = nn.Linear(5, 7)
            self.register_buffer("offset", torch.arange(7, dtype=torch.float32) / 10)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.fc1(self.embed(ids)))
            h = h + self.frozen(h).sum(-1, keepdim=True)
            return self.head(h) * self.scale + self.offset

    return Tiny()


def _config(stage: int, bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1000,
    }


def _full(p, key: str | None = None):  # noqa: ANN001, ANN202
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    t = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    return None if t is None else t.detach().float().cpu().clone().contiguous()


def _train_one(name: str, out: Path) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    spec = VARIANTS[name]
    torch.manual_seed(0)
    model = _model()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim > 1]
    no_decay = [p for n, p in trainable if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_config(spec["stage"], spec["bf16"]),
                                      model_parameters=[p for _, p in trainable])
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        ids = torch.randint(0, 11, (2, 3), generator=gen)
        loss = engine(ids).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
    root = out / name
    engine.save_checkpoint(str(root))
    _relink_optimizer_fragments(engine.optimizer)
    ref = _reference(engine, spec["stage"])
    if rank == 0:
        save_file(ref, str(root / "reference.safetensors"))
    dist.barrier()


def _relink_optimizer_fragments(optimizer) -> None:  # noqa: ANN001
    """Let ``safe_get_full_optimizer_state`` see every group's moments (reference only).

    ZeRO-1/2 and the bf16 optimizer link each parameter to its slice of the moments once, right
    after the first ``step`` of the *first* param group, before torch's AdamW has created the
    second group's state; the second group's parameters then report "exp_avg not found". Linking
    again after training (what DeepSpeed does on its first step) fixes the lookup and touches
    neither the saved files nor any value.
    """
    if hasattr(optimizer, "_hp_optimizer_states_linked"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def _reference(engine, stage: int) -> dict:  # noqa: ANN001
    """Every rank gathers (ZeRO-3 gathers are collective); rank 0's copy is saved."""
    import deepspeed
    import torch

    ref: dict[str, torch.Tensor] = {}
    for n, p in engine.module.named_parameters():
        if p.requires_grad:
            ref[f"model.{n}"] = _full(p)
            for key in ("exp_avg", "exp_avg_sq"):
                ref[f"state.{n}.{key}"] = _full(p, key)
        else:
            with deepspeed.zero.GatheredParameters([p], enabled=stage == 3):
                ref[f"model.{n}"] = p.detach().cpu().clone().contiguous()
    for n, b in engine.module.named_buffers():
        ref[f"model.{n}"] = b.detach().cpu().clone().contiguous()
    ref["step"] = torch.tensor(float(STEPS))
    return ref


def _worker(out: Path, names: list[str]) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    for name in names:
        _train_one(name, out)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--worker":
        _worker(Path(args[1]), args[2:])
    else:
        for variant, path in make_checkpoints(Path(args[0]), args[1:] or None).items():
            print(variant, path)
