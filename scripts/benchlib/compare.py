"""Compare shardfix's output with the baseline's, tensor by tensor, bit for bit.

Model tensors must be equal at every size (any difference is a failure of the run). Moments are
compared where the baseline wrote them under the same names.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

#: baseline name -> the names shardfix gives that tensor's pieces, and how to cut them (None: whole)
Expect = Callable[[str, tuple[int, ...]], dict[str, int | None]]


def identity(name: str, shape: tuple[int, ...]) -> dict[str, int | None]:
    return {name: None}


def unstack_layers(name: str, shape: tuple[int, ...]) -> dict[str, int | None]:
    """Megatron: ``decoder.layers.<rest>`` stacked ``[L, ...]`` -> ``decoder.layers.<i>.<rest>``."""
    head, sep, rest = name.partition("decoder.layers.")
    if not sep or rest.split(".")[0].isdigit():
        return {_megatron_optim(name): None}
    return {_megatron_optim(f"{head}decoder.layers.{i}.{rest}"): i for i in range(shape[0])}


def _megatron_optim(name: str) -> str:
    """``optimizer.state.<state>.<param>`` -> shardfix's ``state.<param>.<state>``."""
    if not name.startswith("optimizer.state."):
        return name
    state, _, param = name.removeprefix("optimizer.state.").partition(".")
    return f"state.{param}.{state}"


def _index(out: Path, optimizer: bool) -> dict[str, Path]:
    from safetensors import safe_open

    found: dict[str, Path] = {}
    for f in sorted(out.glob("*.safetensors")):
        if f.name.startswith("optimizer") != optimizer or f.name.startswith("companions"):
            continue
        with safe_open(f, "pt") as h:
            found.update({k: f for k in h.keys()})
    return found


def _same(x: Any, y: Any) -> bool:
    import torch

    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    return torch.equal(x.contiguous().reshape(-1).view(torch.uint8), y.contiguous().reshape(-1).view(torch.uint8))


def _compare_set(base: dict[str, Path], ours: dict[str, Path], expect: Expect, strict: bool) -> tuple[int, list[str]]:
    from safetensors import safe_open

    problems: list[str] = []
    compared = 0
    seen: set[str] = set()
    for name, f in base.items():
        with safe_open(f, "pt") as h:
            t = h.get_tensor(name)
        for ours_name, index in expect(name, tuple(t.shape)).items():
            seen.add(ours_name)
            if ours_name not in ours:
                if strict:
                    problems.append(f"{ours_name} missing from shardfix's output")
                continue
            with safe_open(ours[ours_name], "pt") as h:
                got = h.get_tensor(ours_name)
            compared += 1
            if not _same(got, t if index is None else t[index]):
                problems.append(f"{ours_name} differs")
    if strict:
        problems += [f"{n} only in shardfix's output" for n in sorted(set(ours) - seen)]
    return compared, problems


def compare_outputs(baseline: Path, shardfix: Path, expect: Expect = identity) -> dict[str, Any]:
    """Model tensors: same names (after ``expect``) and bits; moments: those the baseline has."""
    n_model, model_problems = _compare_set(_index(baseline, False), _index(shardfix, False), expect, strict=True)
    n_optim, optim_problems = _compare_set(_index(baseline, True), _index(shardfix, True), expect, strict=False)
    ok = not model_problems and not optim_problems
    verdict = (f"identical ({n_model} model tensors, {n_optim} moments)" if ok else
               f"MISMATCH: {'; '.join((model_problems + optim_problems)[:5])}"
               f"{' ...' if len(model_problems + optim_problems) > 5 else ''}")
    return {"ok": ok, "model_tensors": n_model, "moments": n_optim, "problems": model_problems + optim_problems,
            "verdict": verdict}
