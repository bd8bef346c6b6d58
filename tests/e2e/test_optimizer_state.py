"""Optimizer state end to end: real torch optimizers saved the ways training scripts save them,
converted, then restored into a fresh optimizer by name with ``load_optimizer_state``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from shardfix import load_optimizer_state
from shardfix.api import convert
from shardfix.options import ConvertOptions
from tests.conftest import bits_equal, run_cli

V, D, R = 48, 16, 4


# -- a LoRA model: frozen base, trained adapters ------------------------------------------------


class LoraLinear(nn.Module):
    def __init__(self, d: int, r: int) -> None:
        super().__init__()
        self.base = nn.Linear(d, d)
        self.lora_A = nn.Parameter(torch.randn(r, d) * 0.1)
        self.lora_B = nn.Parameter(torch.randn(d, r) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.lora_A.T @ self.lora_B.T


class LoraNet(nn.Module):
    """``router.weight`` [R, D] has ``lora_A``'s shape: matching shapes over every parameter is
    ambiguous; over the ``lora_`` parameters it is not."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.router = nn.Linear(D, R, bias=False)
        self.layers = nn.ModuleList(LoraLinear(D, R) for _ in range(2))
        self.head = nn.Linear(D, V)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = x + torch.softmax(self.router(x), -1).mean(-1, keepdim=True)
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return self.head(x)


def lora_model(seed: int = 0) -> LoraNet:
    torch.manual_seed(seed)
    model = LoraNet()
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (4, 8), generator=gen)
    loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train LoRA adapters 3 steps with AdamW (2 groups, the second empty); torch.save it."""
    model = lora_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": trainable, "lr": 1e-2, "weight_decay": 0.01},
                             {"params": [], "weight_decay": 0.0}])
    for s in range(3):
        train_step(model, opt, s)
    path = tmp_path_factory.mktemp("lora") / "lora.pt"
    sd = opt.state_dict()
    assert isinstance(next(iter(sd["state"])), int) and "param_names" not in sd["param_groups"][0]
    torch.save({"model": model.state_dict(), "optimizer": sd, "step": 3}, path)
    return {"path": path, "model": model, "opt": opt, "saved": torch.load(path, weights_only=True)}


def test_lora_shape_match_without_trainable_is_ambiguous_and_model_still_converts(lora_run: dict, tmp_path: Path) -> None:
    r = run_cli("convert", lora_run["path"], tmp_path / "out", "--no-progress")
    assert r.code == 0, r.err
    report = json.loads((tmp_path / "out" / "shardfix-report.json").read_text())
    warning = next(w for w in report["warnings"] if "ambiguous" in w)
    assert "state 0 [4, 16] could be router.weight or layers.0.lora_A" in warning and "--trainable" in warning
    assert not list((tmp_path / "out").glob("optimizer*"))
    model = load_file(tmp_path / "out" / "model.safetensors")
    for name, t in lora_run["saved"]["model"].items():
        assert bits_equal(model[name], t)
    dropped = {e["source"]: e for e in report["ledger"] if e["source"].startswith("optimizer.")}
    assert dropped and all(e["fate"] == "dropped" and "ambiguous" in e["reason"] for e in dropped.values())


def test_lora_converts_with_trainable_and_resumes_bit_for_bit(lora_run: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = convert(lora_run["path"], out, ConvertOptions(trainable="lora_", progress=False))
    assert report["status"] == "complete"
    saved = lora_run["saved"]["optimizer"]
    names = [n for n, p in lora_run["model"].named_parameters() if p.requires_grad]
    written = load_file(out / "optimizer.safetensors")
    assert len(written) == 3 * len(names)
    for i, name in enumerate(names):  # saved ids follow the group order, which is the model order here
        for state, value in saved["state"][i].items():
            assert bits_equal(written[f"state.{name}.{state}"], value)
    groups = json.loads((out / "optimizer_param_groups.json").read_text())["param_groups"]
    assert [g["params"] for g in groups] == [names, []]
    assert groups[0]["lr"] == 1e-2 and groups[1]["weight_decay"] == 0.0
    assert {e["source"] for e in report["ledger"]} >= {"optimizer.param_groups.1.params"}

    # a new model, weights from model.safetensors; an optimizer over its trainable params in one group
    new = lora_model(seed=1)
    new.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    opt = torch.optim.AdamW([p for p in new.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    result = load_optimizer_state(opt, new, out)
    assert result.loaded == names and not result.missing and not result.unexpected and result.ok
    params = dict(new.named_parameters())
    for i, name in enumerate(names):
        for state in ("exp_avg", "exp_avg_sq", "step"):
            assert bits_equal(opt.state[params[name]][state], saved["state"][i][state])

    train_step(lora_run["model"], lora_run["opt"], seed=99)
    train_step(new, opt, seed=99)
    for name, p in lora_run["model"].named_parameters():
        assert bits_equal(params[name].detach(), p.detach()), name


def test_load_optimizer_state_saved_hyperparameters_and_subsets(lora_run: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(lora_run["path"], out, ConvertOptions(trainable="lora_", progress=False))
    new = lora_model()
    a0, b0 = new.layers[0].lora_A, new.layers[0].lora_B
    opt = torch.optim.AdamW([{"params": [a0], "lr": 0.5}, {"params": [b0], "lr": 0.5, "betas": (0.5, 0.5)},
                             {"params": [new.embed.weight]}])
    result = load_optimizer_state(opt, new, out, hyperparameters="saved")
    assert result.loaded == ["layers.0.lora_A", "layers.0.lora_B"]
    assert result.missing == ["embed.weight"]
    assert result.unexpected == ["layers.1.lora_A", "layers.1.lora_B"]
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-2, 1e-3]
    assert opt.param_groups[1]["betas"] == (0.9, 0.999)
    with pytest.raises(Exception, match="strict"):
        load_optimizer_state(opt, new, out, strict=True)


# -- modded-nanogpt style: an `optimizers` list, compiled-model prefixes ------------------------------


class NanoLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(nn.Linear(D, D, bias=False) for _ in range(2))
        self.scalars = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.lm_head = nn.Linear(D, V, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for i, b in enumerate(self.blocks):
            x = x + self.scalars[i] * torch.relu(b(x))
        return self.lm_head(x * self.scalars[-1])


def _nano_optimizers(model: nn.Module, named: bool) -> list[torch.optim.Optimizer]:
    """Adam over head, embeddings and scalars in that group order, plus SGD over the matrices."""
    p = dict(model.named_parameters())

    def grp(names: list[str]) -> list:
        return [(n, p[n]) for n in names] if named else [p[n] for n in names]

    pre = "_orig_mod." if any(n.startswith("_orig_mod.") for n in p) else ""
    adam = torch.optim.Adam([{"params": grp([pre + "lm_head.weight"]), "lr": 0.008},
                             {"params": grp([pre + "embed.weight"]), "lr": 0.6},
                             {"params": grp([pre + "scalars"]), "lr": 0.04}], betas=(0.8, 0.95))
    sgd = torch.optim.SGD(grp([pre + "blocks.0.weight", pre + "blocks.1.weight"]), lr=0.05, momentum=0.95)
    return [adam, sgd]


def _nano_checkpoint(path: Path, named: bool) -> tuple[nn.Module, list[torch.optim.Optimizer]]:
    torch.manual_seed(0)
    model = nn.Module()
    model._orig_mod = NanoLike()  # what saving a torch.compile'd module's state_dict gives
    opts = _nano_optimizers(model, named)
    for s in range(2):
        gen = torch.Generator().manual_seed(s)
        tokens = torch.randint(0, V, (2, 8), generator=gen)
        loss = nn.functional.cross_entropy(model._orig_mod(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten())
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad()
    torch.save({"step": 2, "code": "print('hi')", "model": model.state_dict(),
                "optimizers": [o.state_dict() for o in opts]}, path)
    return model, opts


def _check_nano(out: Path, model: nn.Module, opts: list[torch.optim.Optimizer]) -> None:
    written = load_file(out / "optimizer.safetensors")
    for o in opts:
        for p, st in o.state.items():
            name = next(n for n, q in model._orig_mod.named_parameters() if q is p)
            for k, v in st.items():
                assert bits_equal(written[f"state.{name}.{k}"], v), (name, k)
    groups = json.loads((out / "optimizer_param_groups.json").read_text())["param_groups"]
    assert [(g["optimizer"], g["params"]) for g in groups] == [
        (0, ["lm_head.weight"]), (0, ["embed.weight"]), (0, ["scalars"]), (1, ["blocks.0.weight", "blocks.1.weight"])]
    # restore both into fresh optimizers over a fresh (unwrapped) model
    fresh = NanoLike()
    fresh.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    new_opts = _nano_optimizers(fresh, named=False)
    r0 = load_optimizer_state(new_opts[0], fresh, out)
    r1 = load_optimizer_state(new_opts[1], fresh, out)
    assert r0.loaded == ["lm_head.weight", "embed.weight", "scalars"] and not r0.missing
    assert r1.loaded == ["blocks.0.weight", "blocks.1.weight"] and not r1.missing
    fp = dict(fresh.named_parameters())
    assert bits_equal(new_opts[1].state[fp["blocks.1.weight"]]["momentum_buffer"],
                      opts[1].state[model._orig_mod.blocks[1].weight]["momentum_buffer"])


def test_optimizers_list_maps_by_recorded_param_names(tmp_path: Path) -> None:
    model, opts = _nano_checkpoint(tmp_path / "ckpt.pt", named=True)
    report = convert(tmp_path / "ckpt.pt", tmp_path / "out", ConvertOptions(progress=False))
    assert not [w for w in report["warnings"] if "optimizer" in w]
    rename = next(e for e in report["ledger"] if e["source"] == "optimizers.0.state.1.exp_avg")
    assert "param_names recorded" in rename["actions"][0]["rule"]
    _check_nano(tmp_path / "out", model, opts)


def test_optimizers_list_without_names_needs_param_names_file(tmp_path: Path) -> None:
    model, opts = _nano_checkpoint(tmp_path / "ckpt.pt", named=False)
    # Adam's group order (head, embed, scalars) is not the model's: shapes cannot place it
    r = run_cli("convert", tmp_path / "ckpt.pt", tmp_path / "guess", "--no-progress")
    assert r.code == 0, r.err
    report = json.loads((tmp_path / "guess" / "shardfix-report.json").read_text())
    # optimizer 0: three groups of one parameter each; lm_head and embed have the same shape, so
    # with the groups in any order either could be the head group's: refused, never guessed
    assert any("optimizer 0" in w and "--param-names" in w and "lm_head.weight or embed.weight" in w
               for w in report["warnings"])
    # optimizer 1 is one group over blocks.0 and blocks.1 (the same shape): a group follows the
    # model's order, so it is named by that rule, and the ledger says so
    written = load_file(tmp_path / "guess" / "optimizer.safetensors")
    assert sorted(written) == [f"state.blocks.{i}.weight.momentum_buffer" for i in (0, 1)]
    for i in (0, 1):
        assert bits_equal(written[f"state.blocks.{i}.weight.momentum_buffer"],
                          opts[1].state[model._orig_mod.blocks[i].weight]["momentum_buffer"])
    entry = next(e for e in report["ledger"] if e["source"] == "optimizers.1.state.1.momentum_buffer")
    assert "order-preserving" in entry["actions"][0]["rule"] and "blocks.1.weight" in entry["actions"][0]["rule"]

    names = tmp_path / "names.json"
    names.write_text(json.dumps([["_orig_mod.lm_head.weight", "embed.weight", "scalars"],
                                 ["blocks.0.weight", "blocks.1.weight"]]))
    r = run_cli("convert", tmp_path / "ckpt.pt", tmp_path / "out", "--param-names", names, "--no-progress")
    assert r.code == 0, r.err
    _check_nano(tmp_path / "out", model, opts)
    # a flat list: the optimizers one after the other
    names.write_text("\n".join(["lm_head.weight", "embed.weight", "scalars", "blocks.0.weight", "blocks.1.weight"]))
    convert(tmp_path / "ckpt.pt", tmp_path / "flat", ConvertOptions(param_names=str(names), progress=False))
    _check_nano(tmp_path / "flat", model, opts)


# -- a rank-0-only save of a dim-0 sharded Adam (DistAdam) ---------------------------------------


WS = 8


def _compiled_nano_after_one_adam_step() -> tuple[nn.Module, torch.optim.Adam]:
    """A torch.compile-style wrapped NanoLike and a real Adam after one step on random tokens."""
    torch.manual_seed(0)
    model = nn.Module()
    model._orig_mod = NanoLike()
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    tokens = torch.randint(0, V, (2, 8))
    nn.functional.cross_entropy(model._orig_mod(tokens).flatten(0, 1), tokens.flatten()).backward()
    adam.step()
    return model, adam


@pytest.fixture(scope="module")
def distadam(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """What rank 0 of an 8-rank DistAdam saves: rows 0..n/8-1 of every moment.

    DistAdam applies Adam elementwise to rank r's rows of the averaged gradient, so rank 0's
    moments are exactly rows 0..n/8-1 of the moments a full Adam keeps for the same gradients:
    run a real Adam and keep those rows.
    """
    model, adam = _compiled_nano_after_one_adam_step()
    sd = adam.state_dict()
    for st in sd["state"].values():
        for k in ("exp_avg", "exp_avg_sq"):
            st[k] = st[k][: st[k].shape[0] // WS].clone()
    path = tmp_path_factory.mktemp("distadam") / "ckpt.pt"
    torch.save({"step": 1, "model": model.state_dict(), "optimizers": [sd]}, path)
    ids = {n.removeprefix("_orig_mod."): i for i, (n, _) in enumerate(model.named_parameters())}
    return {"path": path, "model": model, "saved": sd, "ids": ids}


def test_rank0_only_sharded_adam_is_reported_not_written(distadam: dict, tmp_path: Path) -> None:
    report = convert(distadam["path"], tmp_path / "out", ConvertOptions(progress=False))
    assert report["status"] == "complete"
    assert not list((tmp_path / "out").glob("optimizer*"))  # not even the steps: the state is incomplete
    model = load_file(tmp_path / "out" / "model.safetensors")
    for name, t in distadam["model"].state_dict().items():
        assert bits_equal(model[name.removeprefix("_orig_mod.")], t)
    warning = next(w for w in report["warnings"] if "incomplete" in w)
    assert "rows 0..5 of 48 exist (one rank's slice of a world-size-8 sharded state)" in warning
    assert "--partial-optimizer" in warning
    ledger = {e["source"]: e for e in report["ledger"]}
    i = distadam["ids"]["embed.weight"]
    embed = ledger[f"optimizers.0.state.{i}.exp_avg"]
    assert embed["fate"] == "dropped" and "rows 0..5 of 48 exist" in embed["reason"]
    assert ledger[f"optimizers.0.state.{i}.step"]["fate"] == "dropped"

    fresh = NanoLike()
    opt = torch.optim.Adam(fresh.parameters())
    with pytest.raises(Exception, match="no optimizer"):
        load_optimizer_state(opt, fresh, tmp_path / "out")


def test_partial_optimizer_writes_named_slices_with_row_ranges(distadam: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(distadam["path"], out, ConvertOptions(progress=False, vocab_size=40, partial_optimizer=True))
    saved = distadam["saved"]["state"]
    ids = distadam["ids"]
    with safe_open(str(out / "optimizer.safetensors"), framework="pt") as h:
        rows = json.loads(h.metadata()["shardfix.partial_rows"])
        assert set(rows) == set(h.keys())
        assert rows["state.embed.weight.exp_avg.rows_0_6"] == {
            "parameter": "embed.weight", "state": "exp_avg", "rows": [0, 6], "of": 40, "world_size": 8,
            "source": f"optimizers.0.state.{ids['embed.weight']}.exp_avg"}
        assert bits_equal(h.get_tensor("state.embed.weight.exp_avg.rows_0_6"), saved[ids["embed.weight"]]["exp_avg"])
        assert bits_equal(h.get_tensor("state.scalars.exp_avg_sq.rows_0_1"), saved[ids["scalars"]]["exp_avg_sq"])
        # the vocab trim (48 -> 40 rows) keeps all of rank 0's rows 0..5; the range is of the trimmed 40
        assert rows["state.lm_head.weight.exp_avg.rows_0_6"]["of"] == 40
        assert "state.embed.weight.step.rows_0_6" in rows
        assert not [k for k in h.keys() if not k.split(".")[-1].startswith("rows_")]
    fresh = NanoLike()
    fresh.embed = nn.Embedding(40, D)
    fresh.lm_head = nn.Linear(D, 40, bias=False)
    result = load_optimizer_state(torch.optim.Adam(fresh.parameters()), fresh, out)
    assert not result.loaded and len(result.partial) == 15 and len(result.missing) == 5


# -- a real FSDP2 DCP checkpoint (FQN keyed) --------------------------------------------------------


def test_fsdp2_dcp_optimizer_round_trips(fsdp_ckpt: Path, reference: dict, tmp_path: Path) -> None:
    from shardfix.examples.fsdp_train import TinyLM, build_model

    out = tmp_path / "out"
    report = convert(fsdp_ckpt, out, ConvertOptions(vocab_size=1000, progress=False))
    assert report["status"] == "complete"
    vocab_rows = {"embed.weight", "lm_head.weight"}

    # the training run's optimizer, unsharded: the reference state on a model with the padded vocab
    orig = build_model(1000, world_size=2)
    orig.load_state_dict(reference["model"], strict=True)
    orig_opt = torch.optim.AdamW(orig.parameters(), lr=1e-2, weight_decay=0.01)
    ids = {n: i for i, (n, _) in enumerate(orig.named_parameters())}
    group = {**reference["optim"]["param_groups"][0], "params": list(ids.values())}
    orig_opt.load_state_dict({"state": {ids[n]: st for n, st in reference["optim"]["state"].items()},
                              "param_groups": [group]})

    # fine-tuning: a model with the true vocab, weights and moments from the converted output
    new = TinyLM(vocab=1000, world_size=2, pad_vocab=False)
    new.blocks[1].to(torch.bfloat16)
    new.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    opt = torch.optim.AdamW(new.parameters(), lr=1e-2, weight_decay=0.01)
    result = load_optimizer_state(opt, new, out)
    assert result.ok and sorted(result.loaded) == sorted(ids)
    params = dict(new.named_parameters())
    for name, st in reference["optim"]["state"].items():
        for k, v in st.items():
            want = v[:1000] if name in vocab_rows and v.dim() else v
            assert bits_equal(opt.state[params[name]][k], want), (name, k)

    gen = torch.Generator().manual_seed(7)
    for name, p in orig.named_parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        params[name].grad = p.grad[:1000].clone() if name in vocab_rows else p.grad.clone()
    orig_opt.step()
    opt.step()
    for name, p in orig.named_parameters():
        want = p.detach()[:1000] if name in vocab_rows else p.detach()
        assert bits_equal(params[name].detach(), want), name


# -- per-rank torch.save files --------------------------------------------------------------------


def _per_rank_files(dirname: Path, distadam: dict, ranks: range, ws: int = WS, name: str = "ckpt_rank{r}.pt") -> dict:
    """Rank r's file of a DistAdam run in which every rank saves: rows r*n/ws.. of each moment.

    Built, like the ``distadam`` fixture, from a real Adam's full moments (DistAdam's per-rank
    update is elementwise on its rows); the model is saved by rank 0 only.
    """
    model, adam = _compiled_nano_after_one_adam_step()
    full = adam.state_dict()
    dirname.mkdir()
    for r in ranks:
        sd = {"state": {}, "param_groups": full["param_groups"]}
        for i, st in full["state"].items():
            n = st["exp_avg"].shape[0] // ws
            sd["state"][i] = {"step": st["step"], **{k: st[k][r * n:(r + 1) * n].clone() for k in ("exp_avg", "exp_avg_sq")}}
        doc = {"step": 1, "world_size": ws, "optimizers": [sd]}
        if r == 0:
            doc["model"] = model.state_dict()
        torch.save(doc, dirname / name.format(r=r))
    return {"model": model, "adam": adam, "full": full}


def test_per_rank_files_assemble_sharded_moments(distadam: dict, tmp_path: Path) -> None:
    from shardfix.reconcile.keys import OPTIM_CONTAINERS
    from shardfix.sources import detect_format, torchranks

    assert torchranks._OPTIM == OPTIM_CONTAINERS
    run = _per_rank_files(tmp_path / "ckpt", distadam, range(WS))
    assert detect_format(tmp_path / "ckpt") == "torch-ranks"
    report = convert(tmp_path / "ckpt", tmp_path / "out", ConvertOptions(progress=False))
    assert report["status"] == "complete" and not [w for w in report["warnings"] if "optimizer" in w]
    fresh = NanoLike()
    fresh.load_state_dict(load_file(tmp_path / "out" / "model.safetensors"), strict=True)
    opt = torch.optim.Adam(fresh.parameters(), lr=0.01)
    result = load_optimizer_state(opt, fresh, tmp_path / "out")
    assert result.ok and len(result.loaded) == 5
    fp = dict(fresh.named_parameters())
    for name, p in run["model"]._orig_mod.named_parameters():
        for k, v in run["adam"].state[run["model"].get_parameter("_orig_mod." + name)].items():
            assert bits_equal(opt.state[fp[name]][k], v), (name, k)
    entry = next(e for e in report["ledger"] if e["source"] == "optimizers.0.state.0.exp_avg")
    assert entry["fate"] == "written" and entry["shape"][0] == run["full"]["state"][0]["exp_avg"].shape[0]


def test_per_rank_files_with_a_missing_rank_are_refused(distadam: dict, tmp_path: Path) -> None:
    _per_rank_files(tmp_path / "ckpt", distadam, [0, 1, 3], ws=4, name="rank_{r}.pt")
    r = run_cli("plan", tmp_path / "ckpt")
    assert r.code == 2 and "rank file(s) 2 are missing" in r.err and "rank_0.pt on its own" in r.err
    (tmp_path / "ckpt" / "rank_3.pt").unlink()  # ranks 0, 1 of 4: the recorded world size tells
    r = run_cli("plan", tmp_path / "ckpt")
    assert r.code == 2 and "world_size 4" in r.err


def test_tensors_in_param_groups_and_odd_states_are_dropped_with_reasons(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    opt = torch.optim.Adam(list(model.named_parameters()), lr=torch.tensor(0.01))
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    sd["param_groups"][0]["ema_buffer"] = torch.zeros(4)  # an optimizer that keeps a buffer in its group
    sd["state"][1]["exp_avg_sq"] = torch.zeros(4, 1)  # a factored state, not the parameter's shape
    torch.save({"model": model.state_dict(), "optimizer": sd}, tmp_path / "ckpt.pt")
    report = convert(tmp_path / "ckpt.pt", tmp_path / "out", ConvertOptions(progress=False))
    ledger = {e["source"]: e for e in report["ledger"]}
    for key in ("optimizer.param_groups.0.lr", "optimizer.param_groups.0.ema_buffer"):
        assert ledger[key]["fate"] == "dropped" and "inside param group 0" in ledger[key]["reason"]
        assert any(w.startswith(key) for w in report["warnings"])
    assert "differently shaped state" in ledger["optimizer.state.1.exp_avg_sq"]["reason"]
    assert ledger["optimizer.state.1.exp_avg"]["fate"] == "dropped"  # never half a parameter's state
    assert any(w.startswith("0.bias: optimizer state shape [4, 1]") for w in report["warnings"])
    written = load_file(tmp_path / "out" / "optimizer.safetensors")
    assert sorted(written) == ["state.0.weight.exp_avg", "state.0.weight.exp_avg_sq", "state.0.weight.step",
                               "state.1.bias.exp_avg", "state.1.bias.exp_avg_sq", "state.1.bias.step",
                               "state.1.weight.exp_avg", "state.1.weight.exp_avg_sq", "state.1.weight.step"]
    assert bits_equal(written["state.0.weight.exp_avg"], opt.state[model[0].weight]["exp_avg"])
