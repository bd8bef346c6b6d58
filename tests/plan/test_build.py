"""The planner on hand-built source indexes: pure, metadata only, no files.

Each test builds the index a reader would produce and checks the plan's outputs, ledger and
problems: every source entry has exactly one ledger entry, moments follow their parameter's cut,
and every problem is reported at once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shardfix.errors import ReconcileConflictError
from shardfix.options import ConvertOptions
from shardfix.plan import build_plan
from shardfix.sources.base import ObjectEntry, SourceIndex, StoredEntry, TensorEntry
from shardfix.targets import Targets


def _index(*entries: TensorEntry | ObjectEntry, stored: list[StoredEntry] | None = None) -> SourceIndex:
    return SourceIndex(Path("/ckpt"), "test", [Path("/ckpt/f")], 1000, list(entries), stored=stored or [])


def _t(*path: str | int, shape: tuple[int, ...], dtype: str = "F32") -> TensorEntry:
    return TensorEntry(".".join(map(str, path)), tuple(path), dtype, shape)


def _dcp_like() -> SourceIndex:
    return _index(
        _t("model", "_orig_mod", "embed", "weight", shape=(1024, 8)),
        _t("model", "_orig_mod", "blocks", "0", "weight", shape=(8, 8)),
        _t("optim", "state", "_orig_mod.embed.weight", "exp_avg", shape=(1024, 8)),
        _t("optim", "state", "_orig_mod.embed.weight", "step", shape=()),
        ObjectEntry("optim.param_groups.0.lr", ("optim", "param_groups", 0, "lr"), 0.1, "float"),
        ObjectEntry("optim.param_groups.0.params", ("optim", "param_groups", 0, "params"),
                    ["_orig_mod.embed.weight"], "list"),
        ObjectEntry("step", ("step",), 7, "int"),
    )


def test_every_entry_has_one_ledger_entry_and_moments_follow_their_parameter() -> None:
    index = _dcp_like()
    plan = build_plan(index, ConvertOptions(), Targets(vocab=1000))
    assert [e.source for e in plan.ledger] == [e.key for e in index.entries]
    by = {e.source: e for e in plan.ledger}
    embed = by["model._orig_mod.embed.weight"]
    assert embed.fate == "reconciled" and embed.outputs == ["embed.weight"]
    assert [a["action"] for a in embed.actions] == ["rename", "trim"]
    moment = by["optim.state._orig_mod.embed.weight.exp_avg"]
    assert moment.fate == "reconciled" and moment.outputs == ["state.embed.weight.exp_avg"]
    assert by["optim.state._orig_mod.embed.weight.step"].outputs == ["state.embed.weight.step"]
    assert by["optim.param_groups.0.lr"].fate == "recorded"
    assert by["step"].fate == "dropped" and plan.findings["metadata"] == {"step": 7}
    shapes = {t.name: t.shape for f in plan.files for t in f.tensors}
    assert shapes["embed.weight"] == [1000, 8] and shapes["state.embed.weight.exp_avg"] == [1000, 8]
    assert plan.param_groups == [{"optimizer": 0, "group": 0, "lr": 0.1, "params": ["embed.weight"]}]
    assert plan.findings["prefixes_stripped"] == {"_orig_mod.": 2}


def test_files_follow_the_layout_and_the_size_budget() -> None:
    plan = build_plan(_dcp_like(), ConvertOptions(max_shard_size=300))
    names = [f.name for f in plan.files if f.set == "model"]
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_every_problem_is_reported_at_once() -> None:
    index = _index(_t("model", "a", shape=(4, 4)), _t("model", "module", "a", shape=(4, 4)),
                   _t("model", "b", shape=(3,)))
    with pytest.raises(ReconcileConflictError) as e:
        build_plan(index, ConvertOptions(), Targets(shapes={"b": (5,), "c": (1,)}))
    text = str(e.value)
    assert "both become 'a'" in text and "b" in text and "c: named by" in text


def test_stored_partitions_get_their_own_ledger_entries() -> None:
    index = _index(_t("model", "w", shape=(4,)), _t("model", "v", shape=(3,)),
                   stored=[StoredEntry("rank0:flat", "F32", (8,), ["model.w", "model.v"], padding=1),
                           StoredEntry("rank1:pad", "F32", (2,), [], note="only alignment padding")])
    plan = build_plan(index, ConvertOptions())
    by = {e.source: e for e in plan.ledger}
    assert by["rank0:flat"].fate == "split" and by["rank0:flat"].outputs == ["w", "v"]
    assert [a["action"] for a in by["rank0:flat"].actions] == ["assemble", "unpad"]
    assert by["rank1:pad"].fate == "dropped" and by["rank1:pad"].reason == "only alignment padding"


def test_reader_warnings_reach_the_plan() -> None:
    index = _index(_t("model", "w", shape=(4,)))
    index.warnings.append("moments saved in a layout shardfix cannot convert")
    assert "moments saved in a layout shardfix cannot convert" in build_plan(index, ConvertOptions()).warnings


def test_no_optimizer_drops_every_optimizer_entry_with_the_reason() -> None:
    plan = build_plan(_dcp_like(), ConvertOptions(no_optimizer=True))
    dropped = [e for e in plan.ledger if e.source.startswith("optim.")]
    assert dropped and all(e.fate == "dropped" and e.reason == "--no-optimizer" for e in dropped)
    assert not plan.files_of("optimizer")
