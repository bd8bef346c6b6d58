"""The conversion a user of each source format would write, using that format's own tools.

Each baseline runs in its own process, imports its libraries before the clock starts, writes
``model.safetensors`` (and ``optimizer.safetensors`` where the format's tool gives the moments by
name), fsyncs, and returns ``{"seconds", "phases"}``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .measure import fsync_tree

Tensors = dict[str, Any]


class Clock:
    """Phase timer: ``clock.lap("name")`` closes the phase that began at the previous lap."""

    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = now - self.last
        self.last = now

    def result(self, out: Path) -> dict[str, Any]:
        fsync_tree(out)
        self.lap("fsync")
        return {"seconds": self.last - self.t0, "phases": self.phases}


def _save(out: Path, model: Tensors, optim: Tensors | None, clock: Clock) -> dict[str, Any]:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.items()}, out / "model.safetensors")
    if optim:
        save_file({k: v.contiguous() for k, v in optim.items()}, out / "optimizer.safetensors")
    clock.lap("save_file")
    return clock.result(out)


def _named_moments(optim: dict, names: list[str] | None = None) -> Tensors:
    """``state.<name>.<state>`` from a torch ``optimizer.state_dict()`` (names from ``param_names`` or ``names``)."""
    order = names or [n for g in optim["param_groups"] for n in g["param_names"]]
    ids = [i for g in optim["param_groups"] for i in g["params"]]
    by_id = dict(zip(ids, order, strict=True))
    return {f"state.{by_id[i]}.{k}": v for i, st in optim["state"].items() for k, v in st.items()}


def dcp(src: Path, out: Path, vocab: int | None) -> dict[str, Any]:
    """``dcp_to_torch_save``, ``torch.load``, the vocab trim, ``save_file`` for model and moments."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    clock = Clock()
    full = out / "full.pt"
    dcp_to_torch_save(src, full)
    clock.lap("dcp_to_torch_save")
    sd = torch.load(full, weights_only=True)
    full.unlink()
    clock.lap("torch_load")

    def trim(name: str, t: torch.Tensor) -> torch.Tensor:  # what --vocab-size does
        return t[:vocab] if vocab and t.dim() and name.startswith(("embed.", "lm_head.")) else t

    optim = {f"state.{p}.{n}": trim(p, v) for p, st in sd["optim"]["state"].items() for n, v in st.items()}
    return _save(out, {k: trim(k, v) for k, v in sd["model"].items()}, optim, clock)


def torch_save(src: Path, out: Path, vocab: int | None) -> dict[str, Any]:
    """``torch.load`` + ``save_file`` (moments named by the recorded ``param_names``)."""
    import torch

    clock = Clock()
    sd = torch.load(src, weights_only=True)
    clock.lap("torch_load")
    return _save(out, sd["model"], _named_moments(sd["optimizer"]), clock)


def torch_ranks(src: Path, out: Path, vocab: int | None) -> dict[str, Any]:
    """``torch.load`` every rank, ``torch.cat`` each moment's rows in rank order, ``save_file``."""
    import torch

    clock = Clock()
    ranks = [torch.load(src / f"rank_{r}.pt", weights_only=True) for r in range(len(list(src.glob("rank_*.pt"))))]
    clock.lap("torch_load")
    per_rank = [_named_moments(d["optimizer"]) for d in ranks]
    optim = {k: v if v.dim() == 0 else torch.cat([m[k] for m in per_rank]) for k, v in per_rank[0].items()}
    clock.lap("cat")
    return _save(out, ranks[0]["model"], optim, clock)


def safetensors(src: Path, out: Path, vocab: int | None) -> dict[str, Any]:
    """``load_file`` every shard of the index, ``save_file`` one file."""
    from safetensors.torch import load_file

    clock = Clock()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    model: Tensors = {}
    for name in sorted(set(index["weight_map"].values())):
        model.update(load_file(src / name))
    clock.lap("load_file")
    return _save(out, model, None, clock)


def hf_distributed(src: Path, out: Path, vocab: int | None) -> dict[str, Any]:
    """torch's ``consolidate_safetensors_files`` (every key into one output file)."""
    from safetensors import safe_open
    from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files

    clock = Clock()
    keys: set[str] = set()
    for f in src.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            keys.update(h.keys())
    consolidate_safetensors_files(str(src), str(out), {k: 1 for k in keys})
    clock.lap("consolidate")
    return clock.result(out)


def deepspeed(src: Path, out: Path, vocab: int | None) -> dict[str, Any]:
    """DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` + ``save_file`` (model only)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    clock = Clock()
    model = get_fp32_state_dict_from_zero_checkpoint(str(src))
    clock.lap("zero_to_fp32")
    return _save(out, model, None, clock)


def megatron(src: Path, out: Path, vocab: int | None) -> dict[str, Any]:
    """``dcp_to_torch_save`` of the ``iter_*`` directory, ``torch.load``, ``save_file`` of its tensors
    (model keys as stored, stacked layers kept; ``optimizer.state.*`` apart)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    clock = Clock()
    full = out / "full.pt"
    dcp_to_torch_save(src, full)
    clock.lap("dcp_to_torch_save")
    sd = torch.load(full, weights_only=False)  # _extra_state entries are BytesIO: refused by weights_only
    full.unlink()
    clock.lap("torch_load")
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    model = {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}
    optim = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
    return _save(out, model, optim, clock)


def trainer(src: Path, out: Path, vocab: int | None) -> dict[str, Any]:
    """``load_file`` of the model, ``torch.load`` of ``optimizer.pt`` named by ``param_names.json``, ``save_file``."""
    import torch
    from safetensors.torch import load_file

    clock = Clock()
    model = load_file(src / "model.safetensors")
    optim = torch.load(src / "optimizer.pt", weights_only=True)
    clock.lap("load")
    names = json.loads((src.parents[1] / "param_names.json").read_text())
    return _save(out, model, _named_moments(optim, names), clock)


def accelerate(src: Path, out: Path, vocab: int | None) -> dict[str, Any]:
    """accelerate's ``merge_fsdp_weights`` (``accelerate merge-weights``) of ``pytorch_model_fsdp_0`` (model only)."""
    from accelerate.utils import merge_fsdp_weights

    clock = Clock()
    merge_fsdp_weights(str(src / "pytorch_model_fsdp_0"), str(out), safe_serialization=True)
    clock.lap("merge_fsdp_weights")
    return clock.result(out)


def lightning_fsdp(src: Path, out: Path, vocab: int | None) -> dict[str, Any]:
    """Lightning's consolidation (``_load_distributed_checkpoint``, what ``consolidate_checkpoint`` runs), ``save_file``."""
    from lightning.fabric.utilities.consolidate_checkpoint import _load_distributed_checkpoint

    clock = Clock()
    ckpt = _load_distributed_checkpoint(src)
    clock.lap("consolidate")
    optim = {f"state.{p}.{n}": v for p, st in ckpt["optimizer_0"]["state"].items() for n, v in st.items()}
    return _save(out, ckpt["model"], optim, clock)


BASELINES: dict[str, Callable[[Path, Path, int | None], dict[str, Any]]] = {
    "dcp": dcp, "torch-save": torch_save, "torch-ranks": torch_ranks, "safetensors": safetensors,
    "hf-distributed": hf_distributed, "deepspeed": deepspeed, "megatron": megatron, "trainer": trainer,
    "accelerate": accelerate, "lightning-fsdp": lightning_fsdp,
}
