"""The registry of source formats the bench covers: how to generate one, the baseline, the comparison.

Adding a format is one generator, one baseline and one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import baselines, compare


@dataclass(frozen=True)
class Format:
    """One source format.

    Attributes:
        name: the ``--formats`` name.
        generator: ``module:function`` in this package, ``(workdir, size_bytes) -> source path``.
        how: how the generator writes it (for the README and the JSON).
        baseline: ``(src, out, vocab) -> {"seconds", "phases"}``, run in its own process.
        expect: baseline tensor name -> shardfix's names for it.
        options: extra ``ConvertOptions`` for shardfix, given the source path.
        vocab: trim the padded vocab (DCP only, as the original bench did).
    """

    name: str
    generator: str
    how: str
    baseline: Callable[[Path, Path, int | None], dict[str, Any]]
    expect: compare.Expect = compare.identity
    options: Callable[[Path], dict[str, Any]] = field(default=lambda src: {})
    vocab: bool = False


def _trainer_options(src: Path) -> dict[str, Any]:
    return {"param_names": str(src.parents[1] / "param_names.json")}


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("dcp", "gen_dist:dcp", "torch dcp.save of FSDP2-sharded DTensors (random values), 2 gloo ranks",
           baselines.dcp, vocab=True),
    Format("torch-save", "gen_local:torch_save", "torch.save of a model and a real AdamW state_dict (random values)",
           baselines.torch_save),
    Format("torch-ranks", "gen_local:torch_ranks", "torch.save per rank: each rank's rows of every moment, model on rank 0",
           baselines.torch_ranks),
    Format("safetensors", "gen_local:safetensors_dir", "huggingface_hub.save_torch_state_dict, ~4 shards + index",
           baselines.safetensors),
    Format("hf-distributed", "gen_dist:hf_distributed", "torch HuggingFaceStorageWriter(save_distributed=True), 2 gloo ranks",
           baselines.hf_distributed),
    Format("deepspeed", "gen_libs:deepspeed", "DeepSpeed ZeRO-3 save_checkpoint after one real step, 2 gloo ranks",
           baselines.deepspeed),
    Format("megatron", "gen_libs:megatron", "megatron-core dist_checkpointing torch_dist (TP 2, distributed optimizer) "
           "after two real steps (tests/producers/megatron_dist.py, wider)", baselines.megatron, compare.unstack_layers),
    Format("trainer", "gen_libs:trainer", "transformers Trainer checkpoint-1/ after one real step (Llama, 4 layers)",
           baselines.trainer, options=_trainer_options),
    Format("accelerate", "gen_dist:accelerate", "accelerate save_state, FSDP2 SHARDED_STATE_DICT, one real step "
           "(tests/producers/stacks.py, wider)", baselines.accelerate),
    Format("lightning-fsdp", "gen_dist:lightning_fsdp", "Lightning FSDPStrategy(state_dict_type='sharded'), one real step "
           "(tests/producers/stacks.py, wider)", baselines.lightning_fsdp),
]}


def generate(fmt: Format, work: Path, size: int) -> Path:
    """Run ``fmt``'s generator (imports it only now: each pulls its own training library)."""
    import importlib

    module, _, func = fmt.generator.partition(":")
    gen = getattr(importlib.import_module(f"benchlib.{module}"), func)
    return Path(gen(work, size))
