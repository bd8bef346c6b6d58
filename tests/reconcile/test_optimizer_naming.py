"""Naming integer optimizer ids by param-group order (pure rules, no files)."""

from __future__ import annotations

from shardfix.inspect.profiles import hf
from shardfix.inspect.profiles._nanogpt import OPTIMIZER_GROUPS as NANOGPT_GROUPS
from shardfix.reconcile.group_order import declared_sort, group_mappings, tree_orders
from shardfix.reconcile.optimizer import map_ids

D, F, V = 16, 32, 64


def llama(layers: int = 2) -> list[tuple[str, tuple[int, ...]]]:
    """A tiny LlamaForCausalLM's parameters in declaration order (named_parameters order)."""
    out = [("model.embed_tokens.weight", (V, D))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (D, D)), (p + "self_attn.k_proj.weight", (8, D)),
                (p + "self_attn.v_proj.weight", (8, D)), (p + "self_attn.o_proj.weight", (D, D)),
                (p + "mlp.gate_proj.weight", (F, D)), (p + "mlp.up_proj.weight", (F, D)),
                (p + "mlp.down_proj.weight", (D, F)), (p + "input_layernorm.weight", (D,)),
                (p + "post_attention_layernorm.weight", (D,))]
    return out + [("model.norm.weight", (D,)), ("lm_head.weight", (V, D))]


def trainer_groups(model: list[tuple[str, tuple[int, ...]]]) -> tuple[list[list[int]], dict[int, tuple[int, ...]], list[str]]:
    """The Trainer's AdamW: decay params then no-decay params (norms), each in model order."""
    decay = [n for n, s in model if len(s) > 1]
    nodecay = [n for n, s in model if len(s) == 1]
    names = decay + nodecay
    shapes = dict(model)
    return [list(range(len(decay))), list(range(len(decay), len(names)))], {i: shapes[n] for i, n in enumerate(names)}, names


def _map(ids, shapes, model, groups=None, orders=None, classes=(), names_file=None, trainable=None):
    return map_ids(ids, [None] * len(ids), shapes, model, param_names_file=names_file, trainable=trainable,
                   label="the optimizer", groups=groups, orders=orders, group_classes=classes)


def test_trainer_decay_then_no_decay_is_named_by_group_order() -> None:
    model = llama()
    groups, shapes, names = trainer_groups(model)
    m = _map(list(range(len(names))), shapes, model, groups)
    assert m.ok, m.problems
    assert [m.names[i] for i in range(len(names))] == names
    assert m.method.startswith("group order")


def test_groups_may_come_in_any_order() -> None:
    model = llama()
    groups, shapes, names = trainer_groups(model)
    flipped = [[i - len(groups[0]) for i in groups[1]], [i + len(groups[1]) for i in groups[0]]]
    flipped_names = names[len(groups[0]):] + names[:len(groups[0])]
    m = _map(list(range(len(names))), {i: dict(model)[n] for i, n in enumerate(flipped_names)}, model, flipped)
    assert m.ok and [m.names[i] for i in range(len(names))] == flipped_names


def test_without_groups_the_concatenation_must_be_the_model_order() -> None:
    model = llama()
    groups, shapes, names = trainer_groups(model)
    # the concatenation is not the model's order: the old whole-optimizer match would not do it
    m = _map(list(range(len(names))), shapes, model)
    assert not m.ok


def test_same_shaped_singleton_groups_are_ambiguous_and_name_the_flag() -> None:
    model = [("embed.weight", (V, D)), ("blocks.0.weight", (D, D)), ("scalars", (8,)), ("lm_head.weight", (V, D))]
    m = _map([0, 1, 2], {0: (V, D), 1: (V, D), 2: (8,)}, model, [[0], [1], [2]])
    assert not m.ok
    assert "lm_head.weight or embed.weight" in m.problems[0] or "embed.weight or lm_head.weight" in m.problems[0]
    assert "--param-names" in m.problems[0]


def test_nanogpt_four_same_shaped_tables_need_the_profiles_grouping() -> None:
    tables = ["embed.weight", "value_embeds.0.weight", "value_embeds.1.weight", "value_embeds.2.weight"]
    model = [(tables[0], (V, D)), *[(t, (V, D)) for t in tables[1:]], ("blocks.0.attn.qkvo_w", (4, D, D)),
             ("lm_head.weight", (V, D)), ("scalars", (10,))]
    ids = list(range(6))  # head, embed x4, scalars: the scripts' Adam groups
    groups = [[0], [1, 2, 3, 4], [5]]
    shapes = {i: (V, D) for i in range(5)} | {5: (10,)}
    assert not _map(ids, shapes, model, groups).ok  # shapes alone: the head could be any table
    m = _map(ids, shapes, model, groups, classes=NANOGPT_GROUPS)
    assert m.ok, m.problems
    assert [m.names[i] for i in ids] == ["lm_head.weight", *tables, "scalars"]
    assert "profile declares the grouping" in m.method


def test_lora_subset_with_trainable() -> None:
    model = [("layers.0.weight", (D, D)), ("layers.0.lora_A", (4, D)), ("layers.0.lora_B", (D, 4)),
             ("layers.1.weight", (D, D)), ("layers.1.lora_A", (4, D)), ("layers.1.lora_B", (D, 4)), ("norm", (D,))]
    # AdamW groups: the B matrices (decay), then the A matrices (another lr), each in model order
    ids = [0, 1, 2, 3]
    shapes = {0: (D, 4), 1: (D, 4), 2: (4, D), 3: (4, D)}
    m = _map(ids, shapes, model, [[0, 1], [2, 3]], trainable="lora_")
    assert m.ok, m.problems
    assert [m.names[i] for i in ids] == ["layers.0.lora_B", "layers.1.lora_B", "layers.0.lora_A", "layers.1.lora_A"]


def test_param_names_in_the_wrong_order_is_refused_naming_the_mismatches() -> None:
    model = llama()
    groups, shapes, names = trainer_groups(model)
    wrong = [n for n, _ in model]  # model order, not the optimizer's group order
    m = _map(list(range(len(names))), shapes, model, groups, names_file=wrong)
    assert not m.ok
    assert "does not fit the state shapes" in m.problems[0] and "--param-names" in m.problems[0]
    assert "named model.layers.0.input_layernorm.weight [16]" in m.problems[0]
    right = _map(list(range(len(names))), shapes, model, groups, names_file=names)
    assert right.ok and right.method == "--param-names"


def test_unknown_model_order_is_refused_naming_param_names() -> None:
    model = llama()
    groups, shapes, names = trainer_groups(model)
    m = map_ids(list(range(len(names))), [None] * len(names), shapes, model, param_names_file=None, trainable=None,
                label="the optimizer", groups=groups, orders=[], order_source="safetensors stores names sorted")
    assert not m.ok and "--param-names" in m.problems[0] and "sorted" in m.problems[0]


def test_declared_llama_order_sorts_a_sorted_header_back() -> None:
    model = llama()
    names = sorted(n for n, _ in model)
    assert declared_sort(names, hf.MODULE_ORDER["llama"]) == [n for n, _ in model]
    assert declared_sort([*names, "model.extra.weight"], hf.MODULE_ORDER["llama"]) is None


def test_tree_orders_keep_weight_before_bias_and_module_lists_by_index() -> None:
    names = ["embed.weight", "fc.bias", "fc.weight", "head.weight", "norm.bias", "norm.weight"]
    orders = tree_orders(names)
    assert orders is not None and len(orders) == 24  # 4! orders of the four modules
    assert all(o.index("fc.weight") + 1 == o.index("fc.bias") for o in orders)
    assert tree_orders([f"layers.{i}.weight" for i in (10, 2, 1)]) == [["layers.1.weight", "layers.2.weight",
                                                                         "layers.10.weight"]]
    assert tree_orders([f"m{i}.weight" for i in range(8)]) is None  # 8! > the cap


def test_a_mapping_unique_in_every_candidate_order_is_taken_else_refused() -> None:
    # Tiny (embed, fc, norm, head) stored sorted: one group over all six parameters
    shapes_of = {"embed.weight": (V, D), "fc.weight": (23, D), "fc.bias": (23,), "norm.weight": (23,),
                 "norm.bias": (23,), "head.weight": (V, 23)}
    true = ["embed.weight", "fc.weight", "fc.bias", "norm.weight", "norm.bias", "head.weight"]
    orders = [[(n, shapes_of[n]) for n in o] for o in tree_orders(sorted(shapes_of)) or []]
    ids = list(range(6))
    shapes = {i: shapes_of[n] for i, n in enumerate(true)}
    m = _map(ids, shapes, orders[0], [ids], orders=orders)
    assert m.ok and [m.names[i] for i in ids] == true
    # two separate groups of one [23] vector each: fc.bias / norm.weight / norm.bias cannot be told apart
    m2 = _map([0, 1], {0: (23,), 1: (23,)}, orders[0], [[0], [1]], orders=orders)
    assert not m2.ok and "--param-names" in m2.problems[0]


def test_sharded_row_slices_are_named_by_group_order() -> None:
    model = [("embed.weight", (8, D)), ("blocks.0.weight", (D, D)), ("lm_head.weight", (12, D)), ("scalars", (8,))]
    # DistAdam world size 4: rank 0 keeps rows 0..n/4-1; groups head, embed, scalars
    m = _map([0, 1, 2], {0: (3, D), 1: (2, D), 2: (2,)}, model, [[0], [1], [2]])
    assert m.ok, m.problems
    assert [m.names[i] for i in (0, 1, 2)] == ["lm_head.weight", "embed.weight", "scalars"]
    assert "1/4 row slices" in m.method


def test_search_budget_refuses_rather_than_guessing() -> None:
    model = [(f"w{i}", (4,)) for i in range(30)]
    res = group_mappings([[i] for i in range(15)] + [[15, 16]], {i: (5,) for i in range(17)}, model,
                         lambda w, h: w == h, budget=1000)
    assert res.mappings == [] and not res.exhausted  # nothing fits: the pruning ends it at once
    res = group_mappings([list(range(i, 30, 3)) for i in range(3)], {}, model, lambda w, h: w == h, budget=50)
    assert res.exhausted or len(res.mappings) == 2
