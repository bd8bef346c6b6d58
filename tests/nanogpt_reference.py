"""A reference forward that reads modded-nanogpt's fused tensors the way each training script does,
and a small model with separate q/k/v/o weights that a converted checkpoint loads into.

Both run :func:`forward`; they differ only in how weights are applied: the reference does the
scripts' fused matmuls (``F.linear(x, qkv_w.flatten(end_dim=1))`` then chunk, ``qkvo_w.view(4,
hdim, dim)``, ``c_fc.T``, ``x @ mlp_bank[i, 1]``, ``x @ lm_head`` for transposed heads), the model
calls one ``nn.Linear`` per projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardfix.examples.nanogpt import Geometry, scalars_length


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    B, T, _ = q.shape
    q, k, v = (t.reshape(B, T, heads, -1).transpose(1, 2) for t in (q, k, v))
    q, k = norm(q), norm(k)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).reshape(B, T, -1)


def forward(tokens: torch.Tensor, w, g: Geometry) -> torch.Tensor:
    """The model, whatever stores its weights: ``w`` applies them."""
    x = x0 = norm(w.embed(tokens))
    for i in range(g.layers):
        a, b = w.lambdas(i)
        x = a * x + b * x0 + w.x0_lambda(i) * x0
        q, k, v = w.qkv(i, norm(x))
        if i == 0:
            v = v + w.value_embed(tokens)
        x = x + w.o(i, _attend(q, k, v, g.heads))
        x = x + w.mlp(i, norm(x))
    return w.head(norm(x))


def relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


class FusedWeights:
    """The training scripts' own use of their (fused, padded, transposed) tensors."""

    def __init__(self, sd: dict[str, torch.Tensor], variant: str, g: Geometry) -> None:
        self.sd, self.v, self.g = sd, variant, g

    def embed(self, tokens):
        return F.embedding(tokens, self.sd["embed.weight"])

    def value_embed(self, tokens):
        if self.v.startswith("banks"):
            return self.sd["value_embeds"].view(self.g.value_embeds, self.g.padded_vocab, -1)[0][tokens]
        return F.embedding(tokens, self.sd["value_embeds.0.weight"])

    def lambdas(self, i):
        if self.v == "small-qkv":
            lam = self.sd[f"blocks.{i}.lambdas"]
            return lam[0], lam[1]
        return self.sd["scalars"][2 * i], self.sd["scalars"][2 * i + 1]

    def x0_lambda(self, i):
        return self.sd["x0_lambdas"][i] if self.v.startswith("banks") else 0.0

    def _qkvo(self, i):
        return self.sd[f"blocks.{i}.attn.qkvo_w"].view(4, self.g.hdim, self.g.dim)

    def qkv(self, i, h):
        sd, d, H, hd = self.sd, self.g.dim, self.g.heads, self.g.head_dim
        if self.v == "small-qkv":
            return F.linear(h, sd[f"blocks.{i}.attn.qkv_w"].flatten(end_dim=1)).chunk(3, dim=-1)
        if self.v == "banks":
            return F.linear(h, sd["attn_bank"][i][: 3 * d]).chunk(3, dim=-1)
        if self.v == "banks-qk-vo":
            qk = sd["qk_bank"][i * H : (i + 1) * H].reshape(2 * H * hd, d)
            q, k = F.linear(h, qk).chunk(2, dim=-1)
            return q, k, F.linear(h, sd["vo_bank"][2 * i])
        return F.linear(h, self._qkvo(i)[:3].flatten(end_dim=1)).chunk(3, dim=-1)

    def o(self, i, y):
        sd, d = self.sd, self.g.dim
        if self.v == "small-qkv":
            return F.linear(y, sd[f"blocks.{i}.attn.c_proj.weight"])
        if self.v == "banks":
            return F.linear(y, sd["attn_bank"][i][3 * d :])
        if self.v == "banks-qk-vo":
            return F.linear(y, sd["vo_bank"][2 * i + 1])
        return F.linear(y, self._qkvo(i)[3])

    def mlp(self, i, h):
        sd = self.sd
        if self.v == "small-qkv":
            return F.linear(relu2(F.linear(h, sd[f"blocks.{i}.mlp.c_fc.weight"])), sd[f"blocks.{i}.mlp.c_proj.weight"])
        if self.v.startswith("qkvo"):
            return F.linear(relu2(F.linear(h, sd[f"blocks.{i}.mlp.c_fc"].T)), sd[f"blocks.{i}.mlp.c_proj"])
        if self.v.startswith("medium"):
            return F.linear(relu2(F.linear(h, sd[f"blocks.{i}.mlp.fc_w"])), sd[f"blocks.{i}.mlp.proj_w"])
        return relu2(F.linear(h, sd["mlp_bank"][i, 0])) @ sd["mlp_bank"][i, 1]

    def head(self, x):
        if self.v == "medium":
            return F.linear(x, self.sd["lm_head_w"])
        if self.v == "medium-head-t":
            return x @ self.sd["lm_head_w"]
        if self.v.startswith("banks"):
            return x @ self.sd["lm_head.weight"]
        return F.linear(x, self.sd["lm_head.weight"])


def _put(root: nn.Module, dotted: str, value: torch.Tensor) -> None:
    *path, leaf = dotted.split(".")
    mod = root
    for part in path:
        if part not in mod._modules:
            mod.add_module(part, nn.Module())
        mod = mod._modules[part]
    mod.register_parameter(leaf, nn.Parameter(value))


def extras(variant: str, g: Geometry) -> dict[str, tuple[int, ...]]:
    """The variant's tensors besides embed, attention, MLP and head, at the true vocab and length."""
    out: dict[str, tuple[int, ...]] = {}
    if variant.startswith("banks"):
        out["value_embeds"] = (g.value_embeds * g.vocab, g.dim)
        out["x0_lambdas"] = (g.layers,)
    else:
        out.update({f"value_embeds.{k}.weight": (g.vocab, g.dim) for k in range(g.value_embeds)})
    if variant == "small-qkv":
        out.update({f"blocks.{i}.lambdas": (2,) for i in range(g.layers)})
    content, _ = scalars_length(variant, g)
    if content:
        out["scalars"] = (content,)
    return out


class SeparateGPT(nn.Module):
    """The fine-tuning side's model: separate q/k/v/o and MLP Linear weights, the true vocab."""

    def __init__(self, variant: str, g: Geometry) -> None:
        super().__init__()
        self.variant, self.g = variant, g
        self.embed = nn.Embedding(g.vocab, g.dim)
        self.blocks = nn.ModuleList()
        for _ in range(g.layers):
            block = nn.Module()
            block.attn = nn.Module()
            for name, (i, o) in {"c_q": (g.dim, g.hdim), "c_k": (g.dim, g.hdim), "c_v": (g.dim, g.hdim),
                                 "c_proj": (g.hdim, g.dim)}.items():
                block.attn.add_module(name, nn.Linear(i, o, bias=False))
            block.mlp = nn.Module()
            block.mlp.c_fc = nn.Linear(g.dim, g.hidden, bias=False)
            block.mlp.c_proj = nn.Linear(g.hidden, g.dim, bias=False)
            self.blocks.append(block)
        self.lm_head = nn.Linear(g.dim, g.vocab, bias=False)
        for name, shape in extras(variant, g).items():
            _put(self, name, torch.zeros(shape))

    def param(self, name: str) -> torch.Tensor:
        return self.get_parameter(name)

    # the weight provider for :func:`forward`
    def value_embed(self, tokens):
        if self.variant.startswith("banks"):
            return self.param("value_embeds").view(self.g.value_embeds, self.g.vocab, -1)[0][tokens]
        return F.embedding(tokens, self.param("value_embeds.0.weight"))

    def lambdas(self, i):
        lam = self.param(f"blocks.{i}.lambdas") if self.variant == "small-qkv" else self.param("scalars")[2 * i : 2 * i + 2]
        return lam[0], lam[1]

    def x0_lambda(self, i):
        return self.param("x0_lambdas")[i] if self.variant.startswith("banks") else 0.0

    def qkv(self, i, h):
        a = self.blocks[i].attn
        return a.c_q(h), a.c_k(h), a.c_v(h)

    def o(self, i, y):
        return self.blocks[i].attn.c_proj(y)

    def mlp(self, i, h):
        m = self.blocks[i].mlp
        return m.c_proj(relu2(m.c_fc(h)))

    def head(self, x):
        return self.lm_head(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return forward(tokens, self, self.g)
