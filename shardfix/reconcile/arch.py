"""Architecture facts and checks: model dim, layers, heads, head_dim, GQA, from shapes and configs.

:class:`Dims` holds what is known about a checkpoint's architecture, each fact with where it came
from (a tensor's shape, or a config field). :func:`check_architecture` compares a config's
heads / kv heads / head_dim / hidden size with every attention tensor's shape and returns one
problem per disagreement, naming the tensor, its shape and the config field -- the check whose
absence once let a model reshape ``[4, 150, 3, 120, 80]`` instead of ``[..., 40, 64]``.

Everything here is pure: shapes and dicts in, facts and problem strings out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: config keys shardfix reads, with the other spellings configs use for them.
CONFIG_ALIASES: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size", "n_embd", "d_model", "model_dim", "dim"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "num_key_value_heads": ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "n_kv_head"),
    "head_dim": ("head_dim",),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "vocab_size": ("vocab_size",),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim"),
}

#: head_dim values tried, in order of how common they are, when only shapes are known.
COMMON_HEAD_DIMS = (128, 64, 96, 80, 256, 32, 112, 160, 192, 48, 16)


@dataclass(slots=True)
class ArchConfig:
    """The attention geometry a config declares. ``head_dim`` is derived when absent."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int | None = None
    vocab: int | None = None
    head_dim_explicit: bool = False
    kv_explicit: bool = False
    origin: str = "the config"


def normalise_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """Map a config's own key spellings (``n_embd``, ``n_head``...) to the Hugging Face names."""
    out: dict[str, Any] = {}
    for key, spellings in CONFIG_ALIASES.items():
        for s in spellings:
            v = data.get(s)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                out[key] = v
                break
    return out


def arch_config(data: Mapping[str, Any], origin: str = "the config") -> tuple[ArchConfig | None, list[str]]:
    """Read the attention geometry from a config dict.

    Returns:
        The config (None when it lacks hidden size or heads) and problems internal to the config
        itself (hidden size not divisible by heads, heads not divisible by kv heads).
    """
    cfg = normalise_config(data)
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    if hidden is None or heads is None:
        return None, []
    problems: list[str] = []
    kv = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            problems.append(f"{origin}: hidden_size={hidden} is not divisible by num_attention_heads={heads}, and "
                            "no head_dim is given; fix num_attention_heads or add head_dim")
        head_dim = max(hidden // heads, 1)
    if heads % kv:
        problems.append(f"{origin}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv} "
                        "(each key/value head must serve a whole number of query heads)")
    return ArchConfig(hidden, heads, kv, head_dim, cfg.get("num_hidden_layers"), cfg.get("vocab_size"),
                      "head_dim" in cfg, "num_key_value_heads" in cfg, origin), problems


@dataclass(slots=True)
class Dims:
    """What is known about a checkpoint's architecture; ``origins`` says where each fact came from."""

    dim: int | None = None
    hdim: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    layers: int | None = None
    attn_layers: int | None = None
    mlp_hidden: int | None = None
    origins: dict[str, str] = field(default_factory=dict)

    def set(self, key: str, value: int | None, origin: str) -> None:
        """Record ``value`` unless the fact is already known (the first source wins)."""
        if value is not None and getattr(self, key) is None:
            setattr(self, key, int(value))
            self.origins[key] = origin

    def with_config(self, cfg: ArchConfig | None) -> Dims:
        """A copy with the facts shapes cannot give (heads, kv heads, head_dim) filled from ``cfg``."""
        out = Dims(self.dim, self.hdim, self.heads, self.kv_heads, self.head_dim, self.layers, self.attn_layers,
                   self.mlp_hidden, dict(self.origins))
        if cfg is not None:
            out.set("heads", cfg.heads, f"{cfg.origin} num_attention_heads")
            out.set("kv_heads", cfg.kv_heads, f"{cfg.origin} num_key_value_heads")
            out.set("head_dim", cfg.head_dim, f"{cfg.origin} head_dim")
            out.set("layers", cfg.layers, f"{cfg.origin} num_hidden_layers")
            out.set("dim", cfg.hidden, f"{cfg.origin} hidden_size")
        return out

    def to_dict(self) -> dict[str, Any]:
        keys = ("dim", "hdim", "heads", "kv_heads", "head_dim", "layers", "attn_layers", "mlp_hidden")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None} | (
            {"origins": dict(self.origins)} if self.origins else {})


def head_candidates(q_rows: int, kv_rows: int | None = None, limit: int = 6) -> list[dict[str, int]]:
    """Plausible (heads, kv_heads, head_dim) for attention projections of ``q_rows`` / ``kv_rows`` rows.

    Shapes alone cannot tell 4 heads of 16 from 2 heads of 32; this lists the common splits,
    most common head_dim first, so a user can check them against the training code.
    """
    out = []
    for hd in COMMON_HEAD_DIMS:
        if q_rows % hd or (kv_rows is not None and kv_rows % hd):
            continue
        item = {"heads": q_rows // hd, "head_dim": hd}
        if kv_rows is not None:
            item["kv_heads"] = kv_rows // hd
        out.append(item)
        if len(out) >= limit:
            break
    return out


# -- the check ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AttnRule:
    """Attention tensors recognised by name: ``pattern`` (a regex on the name after prefix
    stripping) and ``role``: q, k, v, o, qkv (q/k/v stacked, no GQA), qkvo, qkv_gqa
    (``[(H + 2 KV) * head_dim, hidden]``), attn_bank, qk_bank, vo_bank."""

    pattern: str
    role: str

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


#: attention tensors every profile recognises (the names split outputs get, and HF names).
COMMON_ATTENTION = (
    AttnRule(r"(^|\.)(q_proj|c_q|wq|query|q)\.weight$", "q"),
    AttnRule(r"(^|\.)(k_proj|c_k|wk|key|k)\.weight$", "k"),
    AttnRule(r"(^|\.)(v_proj|c_v|wv|value|v)\.weight$", "v"),
    AttnRule(r"(^|\.)(self_attn\.o_proj|attn\.c_proj|attention\.wo|self_attn\.out_proj)\.weight$", "o"),
    AttnRule(r"(^|\.)self_attn\.qkv_proj\.weight$", "qkv_gqa"),
)


def _rows_blame(rows: int, heads: int, head_dim: int, heads_field: str, cfg: ArchConfig) -> str:
    """Which config field most likely disagrees with a tensor that has ``rows`` projection rows."""
    want = heads * head_dim
    if rows % head_dim == 0:
        return (f"{cfg.origin} {heads_field}={heads} (x head_dim {head_dim} = {want} rows), but the tensor holds "
                f"{rows // head_dim} heads of head_dim {head_dim}")
    if rows % heads == 0:
        return (f"{cfg.origin} head_dim={head_dim} ({heads_field} {heads} x {head_dim} = {want} rows), but the tensor "
                f"holds {heads} heads of {rows // heads}")
    return (f"{cfg.origin} {heads_field}={heads} x head_dim={head_dim} = {want} rows, but the tensor has {rows} rows "
            f"(candidates: {head_candidates(rows)[:3]})")


def _hidden_blame(cols: int, cfg: ArchConfig) -> str:
    return f"{cfg.origin} hidden_size={cfg.hidden}, but the tensor's model dim is {cols}"


def _check_rows_cols(name: str, shape: tuple[int, ...], rows: int, cols: int, heads: int, heads_field: str,
                     cfg: ArchConfig, what: str) -> list[str]:
    out = []
    if rows != heads * cfg.head_dim:
        out.append(f"{name}: shape {list(shape)} ({what}): " + _rows_blame(rows, heads, cfg.head_dim, heads_field, cfg))
    if cols != cfg.hidden:
        out.append(f"{name}: shape {list(shape)} ({what}): " + _hidden_blame(cols, cfg))
    return out


def _no_gqa(name: str, shape: tuple[int, ...], cfg: ArchConfig, layout: str) -> list[str]:
    if cfg.kv_heads != cfg.heads:
        return [f"{name}: shape {list(shape)} ({layout}) has as many key/value heads as query heads (no grouped-query "
                f"attention), but {cfg.origin} num_key_value_heads={cfg.kv_heads} != num_attention_heads={cfg.heads}"]
    return []


def check_tensor(name: str, shape: tuple[int, ...], role: str, cfg: ArchConfig) -> list[str]:
    """Problems with one attention tensor of a known ``role`` under ``cfg`` (empty when it fits)."""
    s = tuple(shape)
    H, KV, hd, hidden = cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.hidden
    bad_rank = [f"{name}: shape {list(s)} is not a {role} attention weight of any geometry (unexpected rank)"]
    if role in ("q", "k", "v"):
        if len(s) != 2:
            return bad_rank
        heads, fld = (H, "num_attention_heads") if role == "q" else (KV, "num_key_value_heads")
        return _check_rows_cols(name, s, s[0], s[1], heads, fld, cfg, f"{role} projection [out, in]")
    if role == "o":
        if len(s) != 2:
            return bad_rank
        return _check_rows_cols(name, s, s[1], s[0], H, "num_attention_heads", cfg, "output projection [hidden, heads*head_dim]")
    if role == "qkv":
        if len(s) == 3 and s[0] == 3:
            rows, cols = s[1], s[2]
        elif len(s) == 2 and s[0] % 3 == 0:
            rows, cols = s[0] // 3, s[1]
        else:
            return bad_rank
        return _check_rows_cols(name, s, rows, cols, H, "num_attention_heads", cfg, "q, k, v stacked") + _no_gqa(
            name, s, cfg, "q, k, v stacked")
    if role == "qkvo":
        if len(s) == 3 and s[0] == 4:
            rows, cols = s[1], s[2]
        elif len(s) == 2 and (s[1] == 4 * hidden or (s[0] != 4 * hidden and s[1] > s[0] and s[1] % 4 == 0)):
            rows, cols = s[0], s[1] // 4  # stored [heads*head_dim, 4 * hidden]
        elif len(s) == 2 and s[0] % 4 == 0:
            rows, cols = s[1], s[0] // 4  # stored [4 * hidden, heads*head_dim]
        else:
            return bad_rank
        return _check_rows_cols(name, s, rows, cols, H, "num_attention_heads", cfg, "q, k, v, o stacked") + _no_gqa(
            name, s, cfg, "q, k, v, o stacked")
    if role == "attn_bank":
        if len(s) != 3 or s[1] % 4:
            return bad_rank
        return _check_rows_cols(name, s, s[2], s[1] // 4, H, "num_attention_heads", cfg,
                                "bank of [4 * hidden, heads*head_dim] q/k/v/o slots") + _no_gqa(name, s, cfg, "attn_bank")
    if role == "qk_bank":
        if len(s) != 3 or s[1] % 2:
            return bad_rank
        out = []
        if s[1] // 2 != hd:
            out.append(f"{name}: shape {list(s)} (groups of [2 * head_dim, hidden]): {cfg.origin} head_dim={hd}, but "
                       f"the bank's groups hold heads of {s[1] // 2}")
        if s[2] != hidden:
            out.append(f"{name}: shape {list(s)}: " + _hidden_blame(s[2], cfg))
        return out + _no_gqa(name, s, cfg, "qk_bank")
    if role == "vo_bank":
        if len(s) != 3:
            return bad_rank
        return _check_rows_cols(name, s, s[1], s[2], H, "num_attention_heads", cfg, "bank of [heads*head_dim, hidden] v/o slots")
    if role == "qkv_gqa":
        if len(s) != 2:
            return bad_rank
        out = []
        want = (H + 2 * KV) * hd
        if s[0] != want:
            out.append(f"{name}: shape {list(s)} (q, k, v concatenated): {cfg.origin} num_attention_heads={H}, "
                       f"num_key_value_heads={KV}, head_dim={hd} give ({H} + 2 x {KV}) x {hd} = {want} rows, but the "
                       f"tensor has {s[0]}")
        if s[1] != hidden:
            out.append(f"{name}: shape {list(s)}: " + _hidden_blame(s[1], cfg))
        return out
    raise ValueError(f"unknown attention role {role!r}")  # pragma: no cover - rules are shardfix's own


def check_architecture(shapes: Mapping[str, tuple[int, ...]], cfg: ArchConfig,
                       rules: Iterable[AttnRule] = ()) -> list[str]:
    """Compare ``cfg`` with every attention tensor in ``shapes`` (names -> shapes).

    ``rules`` are the active profile's own attention tensors (fused ones), tried before the
    common names. When the config gives a head_dim with ``hidden != heads * head_dim`` (legal
    for some models), the tensors decide: it is a problem only when no attention tensor was
    found to confirm it.

    Returns:
        One problem per disagreement, naming the tensor, its shape and the config field.
    """
    rules = [*rules, *COMMON_ATTENTION]
    problems: list[str] = []
    checked = 0
    for name, shape in shapes.items():
        rule = next((r for r in rules if r.matches(name)), None)
        if rule is None:
            continue
        checked += 1
        problems += check_tensor(name, tuple(shape), rule.role, cfg)
    if cfg.hidden != cfg.heads * cfg.head_dim and not checked:
        problems.append(f"{cfg.origin}: hidden_size={cfg.hidden} != num_attention_heads={cfg.heads} x "
                        f"head_dim={cfg.head_dim} = {cfg.heads * cfg.head_dim}, and no attention tensor was found "
                        "to confirm a model that decouples them; check the config")
    return problems
