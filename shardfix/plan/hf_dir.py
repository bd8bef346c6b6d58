"""Make a plan's output a directory fine-tuning loads as is: Hugging Face config, tokenizer, tied embeddings, adapter.

:func:`hf_directory` runs after planning, with the source open (the tied-embedding check reads two
tensors), and adds to the plan:

* the PEFT split (:mod:`shardfix.plan.adapter`): base model under plain names, ``adapter/``;
* ``config.json``: the config of ``--target-config``, or one in or beside the source
  (:func:`~shardfix.outputs.hf_config.sidecar_candidates`), reconciled with what shardfix did
  (:func:`~shardfix.outputs.hf_config.reconcile_config`); the change records go into the report;
* tied embeddings as ``save_pretrained`` writes them: when the config ties them and the output
  embedding's bytes equal the input embedding's, the output embedding is not written (a ledger
  drop with the reason); when the bytes differ it is kept, with a warning;
* ``generation_config.json`` beside the config or the source, and the tokenizer files of ``--tokenizer``.

Every file is a :class:`~shardfix.outputs.layout.Sidecar`: staged and placed by the output layout
after the data files, listed in the report with its checksum, checked by ``verify``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shardfix.dtypes import CAST_CHOICES
from shardfix.errors import BadInputError
from shardfix.options import ConvertOptions
from shardfix.outputs.hf_config import TIED_PAIRS, ConfigFacts, reconcile_config, tied_duplicates
from shardfix.outputs.hf_files import find_config, find_generation_config, list_tokenizer_files, read_json_object
from shardfix.outputs.layout import MODEL, Sidecar
from shardfix.plan.adapter import split_adapter
from shardfix.plan.types import OutputTensor, Plan
from shardfix.sources.base import Source

_TORCH_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def hf_directory(plan: Plan, source: Source, opts: ConvertOptions) -> None:
    """Add the Hugging Face directory's sidecars to ``plan`` (see the module docstring)."""
    src = Path(plan.source["path"])
    sidecars: list[Sidecar] = []
    adapter = split_adapter(plan, opts, src)
    found = _config_path(opts, src)
    if found is not None:
        sidecars += _config_sidecars(plan, source, opts, src, *found)
    if opts.tokenizer:
        base = Path(opts.tokenizer)
        base = base if base.is_dir() else base.parent
        sidecars += [Sidecar(f.relative_to(base).as_posix(), None, "tokenizer file", copy_from=str(f))
                     for f in list_tokenizer_files(Path(opts.tokenizer))]
    if adapter is not None:
        sidecars.append(adapter)
    plan.sidecars.extend(sidecars)


def _config_path(opts: ConvertOptions, src: Path) -> tuple[Path, str, bool] | None:
    """(config path, its origin for messages, whether it was given) or None when there is none."""
    if opts.target_config:
        return Path(opts.target_config), f"--target-config {opts.target_config}", True
    found = find_config(src)
    return (found, f"{found} (beside the source)", False) if found is not None else None


def _config_sidecars(plan: Plan, source: Source, opts: ConvertOptions, src: Path, path: Path, origin: str,
                     given: bool) -> list[Sidecar]:
    """``config.json`` (reconciled) and ``generation_config.json``; a found config that is not a model's is skipped."""
    config = read_json_object(path, origin)
    if not given and not isinstance(config.get("model_type"), str):
        plan.warnings.append(f"{origin}: has no model_type (not a Hugging Face model config); no config.json written "
                             "-- pass --target-config for a directory from_pretrained loads")
        return []
    tied, tied_from = _tie(plan, source, config)
    facts = ConfigFacts(vocab_size=plan.findings.get("target_vocab"), vocab_from=_vocab_flag(opts),
                        padded_vocab=plan.findings.get("padded_vocab"), tied=tied, tied_from=tied_from,
                        dtype=_TORCH_DTYPE.get(CAST_CHOICES[opts.dtype] or ""))
    written, changes = reconcile_config(config, facts, origin)
    out = [Sidecar("config.json", written, "model config", {"from": origin, "changes": changes})]
    gen = find_generation_config(path, src)
    if gen is not None:
        out.append(Sidecar("generation_config.json", None, "generation config", {"from": str(gen)}, copy_from=str(gen)))
    return out


def _vocab_flag(opts: ConvertOptions) -> str:
    """The flag the reconciled vocab came from, in the order the targets take them."""
    if opts.vocab_size is not None:
        return "--vocab-size"
    return "--tokenizer" if opts.tokenizer else "--target-config"


def _ties(config: dict[str, Any]) -> bool | None:
    text = config.get("text_config")
    if "tie_word_embeddings" not in config and isinstance(text, dict):
        config = text
    value = config.get("tie_word_embeddings")
    return None if value is None else bool(value)


def _tie(plan: Plan, source: Source, config: dict[str, Any]) -> tuple[bool | None, str]:
    """Whether the written weights are tied, and why; drops the output embedding when the config ties equal bytes."""
    model = {t.name: t for f in plan.files_of(MODEL) for t in f.tensors}
    pairs = tied_duplicates(model, True)
    if not pairs:
        inputs = [i for o, i in TIED_PAIRS if i in model and o not in model]
        return (True, f"the checkpoint has no output embedding beside {inputs[0]}") if inputs else (None, "")
    if not _ties(config):
        dup, kept = next(iter(pairs.items()))
        return False, f"the checkpoint stores {dup} apart from {kept}"
    for dup, kept in pairs.items():
        if not _same_bytes(source, model[dup], model[kept]):
            plan.warnings.append(f"{dup}: the config ties it to {kept} but their values differ; both are written, and "
                                 "transformers then loads them untied (check that this is the right config)")
            return None, ""
    for dup, kept in pairs.items():
        _drop_output(plan, model[dup], kept)
    dup, kept = next(iter(pairs.items()))
    return True, f"{dup} equals {kept}"


def _same_bytes(source: Source, a: OutputTensor, b: OutputTensor) -> bool:
    """Whether two planned outputs have identical bytes (read from the source, ops applied)."""
    import torch

    from shardfix.reconcile.ops import apply_ops

    if a.dtype != b.dtype or a.shape != b.shape or a.origin != "source" or b.origin != "source":
        return False
    x = apply_ops(source.read_tensor(a.source), a.ops).contiguous()
    y = apply_ops(source.read_tensor(b.source), b.ops).contiguous()
    return bool(x.reshape(-1).view(torch.uint8).equal(y.reshape(-1).view(torch.uint8)))


def _drop_output(plan: Plan, t: OutputTensor, kept: str) -> None:
    """Leave a tied output embedding out of the model files (repacked), with the reason in its ledger entry."""
    from shardfix.plan.build import assign_files

    keep = [x for f in plan.files_of(MODEL) for x in f.tensors if x is not t]
    if not keep:
        raise BadInputError("the model has no tensors left after leaving out tied embeddings")
    max_bytes = int(plan.options.get("max_shard_size") or 5 * 10**9)
    plan.files = assign_files(keep, MODEL, max_bytes) + [f for f in plan.files if f.set != MODEL]
    reason = (f"tied to {kept}: the config sets tie_word_embeddings and the bytes are equal, so it is left out as "
              "save_pretrained does and transformers ties it back on load")
    for e in plan.ledger:
        if e.origin is None and e.source == t.source:
            e.outputs = [o for o in e.outputs if o != t.name]
            e.actions.append({"action": "drop", "output": t.name, "rule": "tied embedding"})
            if not e.outputs:
                e.fate, e.reason = "dropped", reason
