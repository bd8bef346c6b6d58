"""Evidence from the data: which vocab rows were trained, which trailing values are padding.

Target shapes are the truth; evidence only proposes and cross-checks. It reads a few tensors
(an embedding's optimizer moment, small 1-D vectors), one at a time:

* **Untrained vocab rows**: embedding rows whose Adam moments are exactly zero never received
  gradient, so the true vocab is at most the first such row of a trailing all-zero run. (Only
  embeddings: an ``lm_head``'s padded rows do get gradient, since the loss runs over all logits.
  So does every row of an embedding *tied* to the output layer -- ``tie_word_embeddings`` in a
  ``config.json`` beside the checkpoint, or an output layer of the same shape without optimizer
  state of its own (DCP keys a tied parameter's state by its first name) -- so for a tied
  matrix non-zero moments are reported as a finding, not as trained tokens.)
* **World-size padding**: trailing exact ones in a ``scalars``-like vector, and the world sizes
  that padding implies (``pad = (-content) % world_size``).

When the user's target disagrees -- trimming to 24000 discards row 24000 whose moments are
non-zero -- the conversion still follows the target and a warning names the rows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from shardfix.plan import Plan
from shardfix.reconcile.padding import world_sizes_for
from shardfix.sources.base import Source

_EMBED = re.compile(r"(^|\.)(embed|wte|tok_embeddings|word_embeddings|embed_tokens|value_embeds?\.\d+)(\.weight)?$")
_SCALARS = re.compile(r"(^|\.)(scalars|lambdas|skip_weights|.*_lambdas?)$")
_MOMENTS = ("exp_avg_sq", "exp_avg", "momentum_buffer")
_OUTPUT = re.compile(r"(^|\.)(lm_head|output|embed_out)(\.weight)?$")
MAX_VECTOR = 1 << 16


def _ranges(rows: list[int], limit: int = 12) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"`` (capped)."""
    out: list[str] = []
    start: int | None = None
    prev = -2
    for r in rows:
        if start is None:
            start = prev = r
        elif r == prev + 1:
            prev = r
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = r
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(out[:limit]) + (" ..." if len(out) > limit else "")


#: Bytes read at a time when a source can say where a tensor's bytes lie.
_ROW_BLOCK = 16 << 20


def _rows_with_nonzero(source: Source, key: str) -> torch.Tensor:
    """Per row of the 2-D tensor ``key``: does it hold a non-zero value?

    Reads the tensor a block of rows at a time when the source can say where its bytes lie
    (``byte_ranges``), so memory stays at one block however large the embedding; otherwise
    reads it whole.
    """
    entry = next((e for e in source.index.tensors() if e.key == key), None)
    ranges = getattr(source, "byte_ranges", lambda _k: None)(key) if entry is not None else None
    if entry is None or ranges is None:
        t = source.read_tensor(key)
        return (t.reshape(t.shape[0], -1) != 0).any(dim=1)
    from shardfix.dtypes import torch_dtype
    from shardfix.io.preads import fill

    dtype = torch_dtype(entry.dtype)
    rows = entry.shape[0]
    row_bytes = entry.nbytes // rows if rows else 0
    out = torch.zeros(rows, dtype=torch.bool)
    if not row_bytes:
        return out
    per = max(1, _ROW_BLOCK // row_bytes)
    buf = torch.empty(per * row_bytes, dtype=torch.uint8)
    done = 0
    for r in ranges:
        if r.nbytes % row_bytes:  # a range that does not hold whole rows: read it the plain way
            t = source.read_tensor(key)
            return (t.reshape(rows, -1) != 0).any(dim=1)
        for first in range(0, r.nbytes // row_bytes, per):
            n = min(per, r.nbytes // row_bytes - first)
            view = buf[: n * row_bytes]
            fill(r.fd, r.offset + first * row_bytes, view.numpy().data, r.origin, key)
            out[done : done + n] = (view.view(dtype).reshape(n, -1) != 0).any(dim=1)
            done += n
    return out


def gather_evidence(plan: Plan, source: Source) -> tuple[dict[str, Any], list[str]]:
    """Read the few tensors evidence needs; return (findings, warnings)."""
    findings: dict[str, Any] = {"vocab_rows": [], "padding_vectors": []}
    warnings: list[str] = []
    ledger = {e.source: e for e in plan.ledger if e.origin is None}
    model_entries = {e.outputs[0]: e for e in ledger.values() if e.outputs and not e.outputs[0].startswith("state.")
                     and e.kind == "tensor"}
    state_keys = {o: e.source for e in ledger.values() for o in e.outputs if o.startswith("state.")}
    target_vocab = plan.findings.get("target_vocab")
    padded = plan.findings.get("padded_vocab")
    for name, entry in model_entries.items():
        shape = entry.shape or []
        if _EMBED.search(name) and len(shape) == 2 and padded and shape[0] == padded:
            moment = next((state_keys[f"state.{name}.{m}"] for m in _MOMENTS if f"state.{name}.{m}" in state_keys), None)
            if moment is None:
                continue
            trained = _rows_with_nonzero(source, moment)
            rows = torch.nonzero(~trained).flatten().tolist()
            last_trained = int(torch.nonzero(trained).max()) if bool(trained.any()) else -1
            item = {"tensor": name, "rows": shape[0], "moment": moment, "untrained_rows": len(rows),
                    "trailing_untrained_from": last_trained + 1, "likely_vocab_at_most": last_trained + 1}
            tied = _tied_to_output(plan, name, shape, model_entries, state_keys)
            findings["vocab_rows"].append(item)
            if tied:
                item.update(tied=tied, likely_vocab_at_most=None,
                            note="every row of a matrix tied to the output layer gets gradient through the softmax, so "
                                 "non-zero moments in padded rows do not mean those tokens were trained")
                continue
            if target_vocab is not None and target_vocab <= last_trained:
                kept = target_vocab
                discarded = torch.nonzero(trained[kept:]).flatten().add(kept).tolist()
                warnings.append(
                    f"{name}: trimming to vocab {target_vocab} discards row(s) {_ranges(discarded)} whose optimizer "
                    f"moments ({moment}) are non-zero, i.e. tokens that were trained; check the tokenizer"
                )
    for name, entry in model_entries.items():
        shape = entry.shape or []
        if len(shape) == 1 and 0 < shape[0] <= MAX_VECTOR and _SCALARS.search(name) and entry.dtype in ("F32", "BF16", "F16"):
            v = source.read_tensor(entry.source).float()
            ones = 0
            for x in reversed(v.tolist()):
                if x != 1.0:
                    break
                ones += 1
            sizes = [ws for ws in world_sizes_for(shape[0], shape[0] - ones) if ws <= 1024] if ones else []
            item = {"tensor": name, "length": shape[0], "trailing_ones": ones, "implied_world_sizes": sizes[:16]}
            findings["padding_vectors"].append(item)
            out_shape = next((t.shape for f in plan.files for t in f.tensors if t.source == entry.source), None)
            if out_shape is not None and out_shape and out_shape[0] < shape[0] - ones:
                cut = v[out_shape[0]:shape[0] - ones]
                warnings.append(f"{name}: the target length {out_shape[0]} also trims {cut.numel()} value(s) that are not "
                                f"padding ones (indices {out_shape[0]}..{shape[0] - ones - 1})")
    return findings, warnings


def _tied_to_output(plan: Plan, name: str, shape: list[int], model_entries: dict[str, Any],
                    state_keys: dict[str, str]) -> str | None:
    """Why the embedding ``name`` is the output layer's matrix too, or None.

    ``tie_word_embeddings`` in a ``config.json`` beside the checkpoint (or in its parent, for a
    DCP directory), or an output layer of the same shape whose optimizer state is absent while the
    embedding's is present (DCP and torch key a tied parameter's state once, by its first name).
    """
    path = Path(plan.source.get("path", ""))
    for where in (path if path.is_dir() else path.parent, path.parent):
        try:
            config = json.loads((where / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and config.get("tie_word_embeddings") is True:
            return f"tie_word_embeddings in {where / 'config.json'}"
    for out_name, entry in model_entries.items():
        if out_name != name and _OUTPUT.search(out_name) and list(entry.shape or []) == list(shape):
            if not any(f"state.{out_name}.{m}" in state_keys for m in _MOMENTS):
                return f"{out_name} has the same shape and no optimizer state of its own (one state for both names)"
    return None
