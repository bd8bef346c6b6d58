"""Tiny modded-nanogpt checkpoints, laid out the way each version of the training script saves them.

What rank 0 writes at the end of training (docs/formats/core.md): ``torch.save(dict(step=..., code=<script
text>, model=model.state_dict(), optimizers=[opt.state_dict() for opt in optimizers]))`` with every
model key under ``_orig_mod.`` (the compiled module was saved). Dimensions are scaled down (dim 64,
4 heads of 16, a few layers, vocab 1000 padded to ``next_multiple_of_n(1000, n=128)`` = 1024,
``scalars`` padded with ones to a multiple of the world size) so tests run in seconds.

Variants (:data:`VARIANTS`):

* ``small-qkv``: ``attn.qkv_w`` ``[3, hdim, dim]``, Linear ``attn.c_proj``, ``mlp.c_fc``,
  ``mlp.c_proj``; the embedding and value embeddings have the true vocab, ``lm_head`` is padded.
* ``qkvo-4hd`` / ``qkvo-h4d`` / ``qkvo-4dh``: ``attn.qkvo_w`` stored ``[4, hdim, dim]``,
  ``[hdim, 4 * dim]`` or ``[4 * dim, hdim]`` (the same bytes), raw ``mlp.c_fc`` (used
  transposed) and ``mlp.c_proj`` parameters of shape ``[dim, 4 * dim]``, padded ``scalars``.
* ``medium`` / ``medium-head-t``: ``qkvo_w``, ``mlp.fc_w`` / ``mlp.proj_w``, ``lm_head_w``
  ``[vocab, dim]`` or (later versions) ``[dim, vocab]``.
* ``banks``: ``attn_bank`` ``[layers, 4 * dim, hdim]``, ``mlp_bank`` ``[layers + 1, 2, 4 * dim,
  dim]`` whose last slot is a padding layer, ``lm_head.weight`` stored ``[dim, vocab]``.
* ``banks-qk-vo``: ``qk_bank`` / ``vo_bank`` padded with zero rows to a multiple of the world
  size, and ``mlp_bank`` as above.

The optimizers are real torch optimizers stepped once: Adam over head, embeddings and scalars
(in that order, as the scripts build it) and SGD with momentum standing in for Muon over the
matrices. Their param groups hold integer ids like the scripts' (``named_optimizer=True``
records ``param_names`` too). The 2026 bank versions save a custom optimizer object that needs
full unpickling; those files are written without optimizer state.

Run ``python -m shardfix.examples.nanogpt OUT_DIR`` to write one file per variant.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

VARIANTS: dict[str, str] = {
    "small-qkv": "attn.qkv_w [3, hdim, dim] + Linear c_proj / mlp.c_fc / mlp.c_proj ('small', early 2025)",
    "qkvo-4hd": "attn.qkvo_w [4, hdim, dim] + raw mlp.c_fc / mlp.c_proj (mid 2025)",
    "qkvo-h4d": "attn.qkvo_w [hdim, 4 * dim] + raw mlp.c_fc / mlp.c_proj",
    "qkvo-4dh": "attn.qkvo_w [4 * dim, hdim] + raw mlp.c_fc / mlp.c_proj",
    "medium": "'medium': qkvo_w + mlp.fc_w / mlp.proj_w + lm_head_w [vocab, dim]",
    "medium-head-t": "'medium': qkvo_w + mlp.fc_w / mlp.proj_w + lm_head_w stored [dim, vocab]",
    "banks": "2026: attn_bank + mlp_bank with a padding layer, lm_head stored [dim, vocab]",
    "banks-qk-vo": "2026: qk_bank / vo_bank padded with zero rows + mlp_bank with a padding layer",
}

#: ``scalars`` content per variant, as a function of the layer count (docs/formats/core.md lists 5L, 6L,
#: 5L+2, 4L+3, 3L+3, 2L+3, 2L+2 across versions); the small version has no ``scalars``.
SCALARS_CONTENT = {
    "qkvo-4hd": lambda L: 5 * L, "qkvo-h4d": lambda L: 5 * L, "qkvo-4dh": lambda L: 5 * L,
    "medium": lambda L: 5 * L + 2, "medium-head-t": lambda L: 5 * L + 2,
    "banks": lambda L: 2 * L + 3, "banks-qk-vo": lambda L: 2 * L + 2,
}


def next_multiple_of_n(v: int, *, n: int) -> int:
    """The training scripts' padding helper: the smallest multiple of ``n`` that is at least ``v``."""
    return next(x for x in range(n, int(v) + 1 + n, n) if x >= v)


@dataclass(frozen=True, slots=True)
class Geometry:
    """Scaled-down model dimensions."""

    dim: int = 64
    heads: int = 4
    layers: int = 2
    vocab: int = 1000
    world_size: int = 8
    value_embeds: int = 2

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def hdim(self) -> int:
        return self.heads * self.head_dim

    @property
    def hidden(self) -> int:
        return 4 * self.dim

    @property
    def padded_vocab(self) -> int:
        return next_multiple_of_n(self.vocab, n=128)


def default_geometry(variant: str) -> Geometry:
    """The geometry the tests use: 3 layers for the bank versions (so padding shows), 2 otherwise."""
    return Geometry(layers=3) if variant.startswith("banks") else Geometry()


def scalars_length(variant: str, g: Geometry) -> tuple[int, int]:
    """``(content, padded)`` lengths of ``scalars`` for ``variant`` (``(0, 0)`` when it has none)."""
    if variant not in SCALARS_CONTENT:
        return 0, 0
    content = SCALARS_CONTENT[variant](g.layers)
    return content, content + (-content) % g.world_size


def build_params(variant: str, g: Geometry, seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's tensors for ``variant`` (names as the script's ``state_dict`` has them, unprefixed)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    gen = torch.Generator().manual_seed(seed)
    bound = (3**0.5) * 0.5 * g.dim**-0.5

    def rand(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=gen) * 2 - 1) * bound

    d, h, hid, L, V, Vp = g.dim, g.hdim, g.hidden, g.layers, g.vocab, g.padded_vocab
    p: dict[str, torch.Tensor] = {}
    banks = variant.startswith("banks")
    p["embed.weight"] = torch.randn(V if variant == "small-qkv" else Vp, d, generator=gen)
    if banks:
        p["value_embeds"] = 0.01 * torch.randn(g.value_embeds * Vp, d, generator=gen)  # one stacked table
    else:
        for k in range(g.value_embeds):
            p[f"value_embeds.{k}.weight"] = torch.randn(V if variant == "small-qkv" else Vp, d, generator=gen)
    if variant == "banks":
        p["attn_bank"] = rand(L, 4 * d, h)
    elif variant == "banks-qk-vo":
        groups, vo = L * g.heads, 2 * L
        p["qk_bank"] = torch.cat([rand(groups, 2 * g.head_dim, d),
                                  torch.zeros(next_multiple_of_n(groups, n=g.world_size) - groups, 2 * g.head_dim, d)])
        p["vo_bank"] = torch.cat([rand(vo, h, d), torch.zeros(next_multiple_of_n(vo, n=g.world_size) - vo, h, d)])
    if banks:
        p["mlp_bank"] = rand(L + 1, 2, hid, d)  # slot L pads the bank; initialised like the others
        p["lm_head.weight"] = rand(d, Vp)  # CastedLinearT: [in, out]
        p["x0_lambdas"] = 0.1 * torch.rand(L, generator=gen)
    for i in range(L if not banks else 0):
        if variant == "small-qkv":
            p[f"blocks.{i}.lambdas"] = torch.tensor([1.0, 0.0]) + 0.1 * torch.rand(2, generator=gen)
            p[f"blocks.{i}.attn.qkv_w"] = rand(3, h, d)
            p[f"blocks.{i}.attn.c_proj.weight"] = rand(d, h)
            p[f"blocks.{i}.mlp.c_fc.weight"] = rand(hid, d)
            p[f"blocks.{i}.mlp.c_proj.weight"] = rand(d, hid)
            continue
        qkvo = rand(4, h, d)
        storage = {"qkvo-h4d": (h, 4 * d), "qkvo-4dh": (4 * d, h)}.get(variant)
        p[f"blocks.{i}.attn.qkvo_w"] = qkvo.reshape(storage) if storage else qkvo
        if variant.startswith("medium"):
            p[f"blocks.{i}.mlp.fc_w"] = rand(hid, d)
            p[f"blocks.{i}.mlp.proj_w"] = rand(d, hid)
        else:
            p[f"blocks.{i}.mlp.c_fc"] = rand(d, hid)  # used as F.linear(x, c_fc.T)
            p[f"blocks.{i}.mlp.c_proj"] = rand(d, hid)  # used as F.linear(x, c_proj)
    if variant == "small-qkv" or variant.startswith("qkvo"):
        p["lm_head.weight"] = rand(Vp, d)
    elif variant == "medium":
        p["lm_head_w"] = rand(Vp, d)
    elif variant == "medium-head-t":
        p["lm_head_w"] = rand(d, Vp)
    content, padded = scalars_length(variant, g)
    if content:
        lambdas = torch.stack([torch.tensor([1.0, 0.0]) + 0.1 * torch.rand(2, generator=gen) for _ in range(L)]).flatten()
        rest = 0.5 + torch.rand(content - 2 * L, generator=gen)
        p["scalars"] = torch.cat([lambdas, rest, torch.ones(padded - content)])
    return p


def _optimizers(params: dict[str, nn.Parameter], named: bool) -> list[torch.optim.Optimizer]:
    """Adam over head, embeddings, scalars (the scripts' order) and SGD-momentum (for Muon) over matrices."""
    def group(names: list[str]) -> list:
        return [(n, params[n]) for n in names] if named else [params[n] for n in names]

    head = [n for n in params if n.startswith("lm_head")]
    embeds = [n for n in params if "embed" in n]
    vectors = [n for n in params if params[n].dim() < 2 and n not in head + embeds]
    matrices = [n for n in params if n not in head + embeds + vectors]
    adam = torch.optim.Adam([{"params": group(head)}, {"params": group(embeds)}, {"params": group(vectors)}],
                            lr=0.008, betas=(0.8, 0.95), eps=1e-10)
    muon = torch.optim.SGD(group(matrices), lr=0.05, momentum=0.95, nesterov=True)
    return [adam, muon]


def _fake_grads(params: dict[str, nn.Parameter], g: Geometry, gen: torch.Generator) -> None:
    """Deterministic gradients; embedding rows past the true vocab get none (they never occur)."""
    for name, p in params.items():
        grad = 0.01 * torch.randn(p.shape, generator=gen)
        if "embed" in name and p.dim() == 2:
            rows = grad.view(-1, g.padded_vocab, p.shape[-1]) if p.shape[0] % g.padded_vocab == 0 else None
            if rows is not None:
                rows[:, g.vocab:] = 0
        p.grad = grad


def make_checkpoint(path: str | Path, variant: str, geometry: Geometry | None = None, *, seed: int = 0,
                    steps: int = 1, named_optimizer: bool = False) -> dict[str, torch.Tensor]:
    """Write ``variant``'s rank-0 checkpoint to ``path``; return its model tensors (unprefixed).

    Args:
        path: the ``.pt`` file to write.
        variant: a key of :data:`VARIANTS`.
        geometry: dimensions (default: :func:`default_geometry`).
        seed: weights and gradients are a function of it.
        steps: optimizer steps taken (the saved ``step``).
        named_optimizer: build the optimizers from (name, parameter) pairs, so torch records
            ``param_names`` in the param groups (the scripts do not).
    """
    g = geometry or default_geometry(variant)
    tensors = build_params(variant, g, seed)
    params = {n: nn.Parameter(t.clone()) for n, t in tensors.items()}
    saved: dict = {"step": steps, "code": f"# modded-nanogpt ({variant}): {VARIANTS[variant]}\n"}
    if not variant.startswith("banks"):
        gen = torch.Generator().manual_seed(seed + 1)
        optimizers = _optimizers(params, named_optimizer)
        for _ in range(steps):
            _fake_grads(params, g, gen)
            for opt in optimizers:
                opt.step()
        saved["optimizers"] = [opt.state_dict() for opt in optimizers]
    model = {n: p.detach() for n, p in params.items()}
    saved["model"] = {f"_orig_mod.{n}": t for n, t in model.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(saved, path)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write tiny modded-nanogpt checkpoints, one per variant.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--variant", choices=list(VARIANTS), action="append", help="default: all")
    args = parser.parse_args(argv)
    for variant in args.variant or VARIANTS:
        make_checkpoint(args.out / f"{variant}.pt", variant)
        print(f"{args.out / f'{variant}.pt'}: {VARIANTS[variant]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
