"""A tiny Hugging Face transformers-style checkpoint directory for the profile tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def hf_dir(path: Path, heads: int = 4, kv: int = 2, hd: int = 16, dim: int = 64, layers: int = 2,
           fused: bool = False) -> Path:
    """A transformers-style safetensors checkpoint with ``config.json`` (grouped-query attention by default)."""
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(1024, dim, generator=gen)}
    for i in range(layers):
        p = f"model.layers.{i}."
        if fused:
            t[p + "self_attn.qkv_proj.weight"] = torch.randn((heads + 2 * kv) * hd, dim, generator=gen)
        else:
            t[p + "self_attn.q_proj.weight"] = torch.randn(heads * hd, dim, generator=gen)
            t[p + "self_attn.k_proj.weight"] = torch.randn(kv * hd, dim, generator=gen)
            t[p + "self_attn.v_proj.weight"] = torch.randn(kv * hd, dim, generator=gen)
        t[p + "self_attn.o_proj.weight"] = torch.randn(dim, heads * hd, generator=gen)
        t[p + "mlp.gate_up_proj.weight" if fused else p + "mlp.gate_proj.weight"] = torch.randn(
            (2 if fused else 1) * 128, dim, generator=gen)
    t["lm_head.weight"] = torch.randn(1024, dim, generator=gen)
    save_file(t, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": dim, "num_attention_heads": heads,
                                                  "num_key_value_heads": kv, "num_hidden_layers": layers,
                                                  "vocab_size": 1000}))
    return path
