"""PEFT name classification: hand-written cases, and a cross-check against real peft's own save names."""

from __future__ import annotations

import pytest

from shardfix.errors import BadInputError
from shardfix.outputs.peft import (
    check_adapter_config,
    classify,
    missing_adapter_config_message,
    propose_adapter_config,
    split_names,
)

P = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(("source", "kind", "name", "part"), [
    (f"{P}{Q}.base_layer.weight", "base", f"{Q}.weight", "base_layer"),
    (f"{P}{Q}.base_layer.bias", "base", f"{Q}.bias", "base_layer"),
    (f"{P}{Q}.lora_A.default.weight", "adapter", f"{P}{Q}.lora_A.weight", "lora_A"),
    (f"{P}{Q}.lora_B.default.bias", "adapter", f"{P}{Q}.lora_B.bias", "lora_B"),  # lora_bias=True
    (f"{P}model.embed_tokens.lora_embedding_A.default", "adapter", f"{P}model.embed_tokens.lora_embedding_A",
     "lora_embedding_A"),
    (f"{P}{Q}.lora_magnitude_vector.default.weight", "adapter", f"{P}{Q}.lora_magnitude_vector",
     "lora_magnitude_vector"),
    (f"{P}lm_head.modules_to_save.default.weight", "adapter", f"{P}lm_head.weight", "modules_to_save"),
    (f"{P}lm_head.original_module.weight", "base", "lm_head.weight", "original_module"),
    (f"{P}model.norm.weight", "base", "model.norm.weight", None),
    # a base module whose name contains a LoRA word is not an adapter tensor
    (f"{P}model.lora_A.weight", "base", "model.lora_A.weight", None),
])
def test_classify(source: str, kind: str, name: str, part: str | None) -> None:
    got = classify(source)
    assert (got.kind, got.name, got.part) == (kind, name, part)


def test_adapter_name_is_taken_from_its_position() -> None:
    got = classify(f"{P}{Q}.lora_A.my_task.weight")
    assert got.adapter == "my_task" and got.name == f"{P}{Q}.lora_A.weight" and got.module == Q


def test_not_wrapped_is_refused() -> None:
    with pytest.raises(BadInputError, match="not a PEFT name"):
        classify("model.norm.weight")


def test_split_refuses_two_adapters_and_none() -> None:
    with pytest.raises(BadInputError, match="adapters a, b"):
        split_names([f"{P}{Q}.lora_A.a.weight", f"{P}{Q}.lora_A.b.weight"])
    with pytest.raises(BadInputError, match="no LoRA adapter"):
        split_names([f"{P}model.norm.weight"])


def _lora_shapes(r: int = 4) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(2):
        for proj, out in (("q_proj", 32), ("v_proj", 16)):
            m = f"{P}model.layers.{i}.self_attn.{proj}"
            shapes |= {f"{m}.base_layer.weight": (out, 32), f"{m}.lora_A.default.weight": (r, 32),
                       f"{m}.lora_B.default.weight": (out, r)}
    return shapes


def test_proposal_reads_rank_and_targets_never_alpha() -> None:
    shapes = _lora_shapes()
    shapes[f"{P}model.layers.1.self_attn.v_proj.lora_A.default.weight"] = (8, 32)
    prop = propose_adapter_config(shapes)
    assert prop == {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj", "v_proj"],
                    "rank_pattern": {"model.layers.1.self_attn.v_proj": 8}}
    assert "lora_alpha" not in prop
    msg = missing_adapter_config_message(_lora_shapes())
    assert '"r": 4' in msg and "lora_alpha" in msg and "--adapter-config" in msg


def test_check_adapter_config() -> None:
    good = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    check_adapter_config(good, _lora_shapes(), "adapter_config.json")
    with pytest.raises(BadInputError, match=r"lora_alpha is missing.*r is 8 but lora_A has 4 rows.*'v_proj'") as e:
        check_adapter_config({"r": 8, "target_modules": ["q_proj"]}, _lora_shapes(), "cfg.json")
    assert str(e.value).startswith("cfg.json")


class _Tiny:
    """A small module tree with the names of a causal LM (embed, attention projections, head)."""

    @staticmethod
    def build():
        import torch
        from torch import nn

        torch.manual_seed(0)
        attn = nn.ModuleDict({"q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 4, bias=False)})
        layer = nn.ModuleDict({"self_attn": attn})
        inner = nn.Module()
        inner.embed_tokens = nn.Embedding(20, 8)
        inner.layers = nn.ModuleList([layer, nn.ModuleDict({"self_attn": nn.ModuleDict(
            {"q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 4, bias=False)})})])
        model = nn.Module()
        model.model = inner
        model.lm_head = nn.Linear(8, 20, bias=False)
        return model


@pytest.mark.parametrize("kwargs", [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["q_proj", "v_proj", "embed_tokens"]},
    {"target_modules": ["q_proj"], "use_dora": True},
    {"target_modules": ["v_proj"], "modules_to_save": ["lm_head"]},
    {"target_modules": ["q_proj"], "lora_bias": True},
    {"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"q_proj": 2}},
], ids=["linear", "embedding", "dora", "modules-to-save", "lora-bias", "rank-pattern"])
def test_matches_real_peft(kwargs: dict) -> None:
    """Our adapter names are exactly what peft saves, and our base names are the unwrapped model's."""
    peft = pytest.importorskip("peft", reason="the cross-check needs peft (pip install -e '.[test-hf]')")
    from peft.utils.save_and_load import get_peft_model_state_dict

    model = _Tiny.build()
    base_names = set(model.state_dict())
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, **kwargs))
    sd = wrapped.state_dict()
    split = split_names(sd)
    assert split.adapter_name == "default"
    assert set(split.adapter.values()) == set(get_peft_model_state_dict(wrapped))
    assert set(split.base.values()) == base_names
    prop = propose_adapter_config({k: tuple(v.shape) for k, v in sd.items()})
    assert prop["r"] == 4 and set(prop["target_modules"]) >= set(kwargs["target_modules"])
    if "rank_pattern" in kwargs:
        assert prop["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.self_attn.q_proj": 2}
