"""What ``shardfix inspect`` says about a checkpoint's layout: profile, architecture, fused tensors.

From the index alone (names, shapes, dtypes): the profile and variant with the evidence that
decided it; layers, model dim, MLP width; padded and likely true vocab; heads and head_dim (from
``--target-config`` when given, otherwise candidates from shapes); the ``scalars`` layout with
its padding and the world sizes that padding implies; which tensors are fused or stored
transposed (by running the profile's split table on the shapes); the optimizer layout.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from shardfix.inspect.profiles import detect_profile, splitter_for
from shardfix.inspect.profiles.base import embedding, model_shapes
from shardfix.options import ConvertOptions
from shardfix.reconcile.arch import Dims, check_architecture, head_candidates
from shardfix.reconcile.fused import Drop, Splitter, split_parts
from shardfix.reconcile.keys import classify, is_flat_model
from shardfix.reconcile.padding import find_multiple, world_sizes_for
from shardfix.sources.base import SourceIndex, TensorEntry

#: tokenizers whose vocab training scripts pad (to a multiple of 64 or 128).
KNOWN_VOCABS = {50257: "the GPT-2 tokenizer", 50000: "a 50000-token tokenizer", 100277: "cl100k_base",
                151643: "the Qwen2 tokenizer", 49152: "the StarCoder tokenizer", 32001: "LLaMA + 1 added token"}

#: ``scalars`` content lengths across modded-nanogpt versions (docs/formats/core.md), for L layers.
SCALARS_FORMULAS = {"5L": lambda L: 5 * L, "6L": lambda L: 6 * L, "5L+2": lambda L: 5 * L + 2,
                    "4L+3": lambda L: 4 * L + 3, "3L+3": lambda L: 3 * L + 3, "2L+3": lambda L: 2 * L + 3,
                    "2L+2": lambda L: 2 * L + 2}


def profile_findings(index: SourceIndex, profile: str | None = None, target_config: str | None = None) -> dict[str, Any]:
    """The layout findings of ``index``; with ``target_config``, also its architecture problems."""
    det = detect_profile(index, profile)
    splitter = splitter_for(index, ConvertOptions(profile=profile, target_config=target_config, split_fused=True),
                            detection=det)
    shapes = model_shapes(index)
    dims = splitter.dims
    arch: dict[str, Any] = {"layers": dims.layers, "model_dim": dims.dim, "hdim": dims.hdim, "mlp_hidden": dims.mlp_hidden,
                            "origins": dict(dims.origins), "heads": _heads(splitter, shapes),
                            "vocab": vocab_findings(shapes, dims, splitter)}
    if splitter.config is not None:
        arch["problems"] = splitter.config_problems + check_architecture(shapes, splitter.config, splitter.attention)
    return {
        "profile": det.to_dict(),
        "architecture": arch,
        "scalars": scalars_findings(shapes.get("scalars"), dims.layers),
        "fused": fused_findings(shapes, splitter),
        "optimizer_layout": optimizer_layout(index, shapes),
    }


def _heads(splitter: Splitter, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    d, cfg = splitter.dims, splitter.config
    if cfg is not None:
        return {"source": cfg.origin, "heads": cfg.heads, "kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim}
    if d.heads and (d.head_dim or d.hdim):
        head_dim = d.head_dim or (d.hdim or 0) // d.heads
        return {"source": "shapes: " + "; ".join(d.origins[k] for k in ("heads", "head_dim") if k in d.origins),
                "heads": d.heads, "kv_heads": d.kv_heads or d.heads, "head_dim": head_dim}
    kv = next((s[0] for n, s in shapes.items() if n.endswith("k_proj.weight") and len(s) == 2), None)
    rows = d.hdim or d.dim
    return {"source": "candidates from shapes (no config: shapes alone cannot tell heads from head_dim)",
            "candidates": head_candidates(rows, kv if kv != rows else None) if rows else []}


def vocab_findings(shapes: dict[str, tuple[int, ...]], dims: Dims, splitter: Splitter) -> dict[str, Any]:
    """Padded vocab (rows of the embedding / lm_head) and the likely true vocab, with why."""
    rows: dict[str, int] = {}
    emb = embedding(shapes)
    if emb:
        rows[emb[0]] = emb[1][0]
    for name in ("lm_head.weight", "lm_head_w", "output.weight"):
        s = shapes.get(name)
        if s and len(s) == 2:
            rows[name] = s[1] if dims.dim is not None and s[0] == dims.dim and s[1] != s[0] else s[0]
    if not rows:
        return {"padded": None, "likely": None, "why": "no embedding or lm_head found"}
    padded = max(rows.values())
    out: dict[str, Any] = {"padded": padded, "rows": rows}
    if len(set(rows.values())) > 1:
        small = min(rows, key=rows.__getitem__)
        out.update(likely=rows[small], why=f"{small} has {rows[small]} rows while " + ", ".join(
            f"{n} has {r}" for n, r in rows.items() if r != rows[small]) + " (padded past the true vocab)")
        return out
    config = splitter.config
    if config is not None and config.vocab:
        out.update(likely=config.vocab, why=f"{config.origin} vocab_size")
        return out
    for v, what in KNOWN_VOCABS.items():
        if v < padded and padded in (find_multiple(v, 128), find_multiple(v, 64)):
            out.update(likely=v, why=f"{padded} is {what} ({v}) rounded up to a multiple of "
                       f"{128 if find_multiple(v, 128) == padded else 64}")
            return out
    multiple = 128 if padded % 128 == 0 else 64 if padded % 64 == 0 else None
    out.update(likely=None, why=(f"{padded} is a multiple of {multiple}: likely padded, true vocab unknown; " if multiple
                                 else "") + "pass --vocab-size, --tokenizer or --target-config")
    return out


def scalars_findings(shape: tuple[int, ...] | None, layers: int | None) -> dict[str, Any] | None:
    """``scalars`` ``[N]``: each documented content length it can hold, its padding and world sizes."""
    if not shape or len(shape) != 1:
        return None
    n = shape[0]
    out: dict[str, Any] = {"length": n, "layers": layers, "candidates": []}
    if layers is None:
        out["note"] = "the layer count is unknown, so the content length cannot be proposed"
        return out
    for formula, f in SCALARS_FORMULAS.items():
        content = f(layers)
        if content > n:
            continue
        sizes = world_sizes_for(n, content, limit=min(n, 1024))
        if content == n or sizes:
            out["candidates"].append({"layout": formula, "content": content, "padding": n - content,
                                      "world_sizes": sizes if content < n else "any"})
    out["candidates"].sort(key=lambda c: c["padding"])
    return out


def fused_findings(shapes: dict[str, tuple[int, ...]], splitter: Splitter) -> list[dict[str, Any]]:
    """Tensors the active profile splits or writes transposed, with the outputs they would become."""
    out = []
    for name, shape in shapes.items():
        res = split_parts(name, shape, None, None, splitter)
        if res is None or isinstance(res, Drop):
            continue
        if isinstance(res, str):
            out.append({"name": name, "shape": list(shape), "problem": res})
            continue
        transposed = len(res) == 1 and any(op["op"] == "transpose" for op in res[0].ops)
        if len(res) == 1 and not transposed:
            continue
        dropped = [a["reason"] for p in res for a in p.actions if a["action"] == "drop"]
        out.append({"name": name, "shape": list(shape), "kind": "transposed" if transposed else "fused",
                    "outputs": [p.name for p in res], **({"dropped": dropped} if dropped else {})})
    return out


def optimizer_layout(index: SourceIndex, shapes: dict[str, tuple[int, ...]]) -> list[dict[str, Any]]:
    """Per optimizer: container, how state is keyed, groups, state names, and moments that match
    no parameter shape (one rank's slice, or a state of another shape)."""
    tensors = [e.path for e in index.tensors()]
    flat = is_flat_model([e.path for e in index.entries], tensors)
    param_shapes = set(shapes.values())
    per: dict[int, dict[str, Any]] = defaultdict(lambda: {"params": set(), "groups": set(), "states": Counter(),
                                                          "keys": set(), "param_names": False, "unmatched": 0})
    for e in index.entries:
        role = classify(e.path, flat)
        if role.kind not in ("optim_state", "param_group"):
            continue
        o = per[role.optimizer]
        o["container"] = ".".join(map(str, role.container))
        if role.kind == "param_group":
            o["groups"].add(role.group)
            o["param_names"] = o["param_names"] or role.hparam == "param_names"
            continue
        o["params"].add(role.param)
        o["states"][role.state] += 1
        o["keys"].add("integer ids" if isinstance(role.param, int) or str(role.param).isdigit() else "parameter names")
        if isinstance(e, TensorEntry) and e.shape and tuple(e.shape) not in param_shapes:
            o["unmatched"] += 1
    return [{"optimizer": k, "container": o.get("container", ""), "parameters": len(o["params"]),
             "param_groups": len(o["groups"]), "keyed_by": " and ".join(sorted(o["keys"])) or "-",
             "states": dict(o["states"]), "param_names_recorded": o["param_names"],
             "moments_matching_no_parameter": o["unmatched"]} for k, o in sorted(per.items())]


def format_profile_findings(info: dict[str, Any], limit: int = 8) -> list[str]:
    """Human lines for :func:`profile_findings` (inside ``format_inspection``)."""
    if "profile" not in info:
        return []
    p, a = info["profile"], info["architecture"]
    lines = [f"profile: {p['name']}" + (f" / {p['variant']}" if p["variant"] else "") + f" (by {p['chosen_by']})"
             + (f": {p['describe']}" if p["describe"] else "")]
    lines += [f"  evidence: {r}" for r in p["evidence"]] + [f"  note: {n}" for n in p["notes"]]
    if p["also_matched"]:
        lines.append("  also matched: " + ", ".join(f"{m['name']} ({m['score']})" for m in p["also_matched"]))
    facts = [f"{a['layers']} layers" if a["layers"] else "layers unknown",
             f"model dim {a['model_dim']}" if a["model_dim"] else "model dim unknown"]
    facts += [f"hdim {a['hdim']}"] if a["hdim"] else []
    facts += [f"MLP hidden {a['mlp_hidden']}"] if a["mlp_hidden"] else []
    lines.append("architecture: " + ", ".join(facts))
    h = a["heads"]
    if "heads" in h:
        lines.append(f"heads: {h['heads']} x head_dim {h['head_dim']}"
                     + (f", {h['kv_heads']} kv heads" if h.get("kv_heads") not in (None, h["heads"]) else "")
                     + f" ({h['source']})")
    else:
        cands = ", ".join(f"{c['heads']} x {c['head_dim']}" + (f" (kv {c['kv_heads']})" if "kv_heads" in c else "")
                          for c in h["candidates"])
        lines.append(f"heads: {cands or 'unknown'} -- {h['source']}")
    v = a["vocab"]
    if v["padded"] is not None:
        likely = f"likely true vocab {v['likely']}" if v["likely"] else "true vocab unknown"
        lines.append(f"vocab:   {v['padded']} rows (padded); {likely} ({v['why']})")
    s = info["scalars"]
    if s:
        cands = "; ".join(f"{c['layout']} = {c['content']} + {c['padding']} padding (world size "
                          f"{', '.join(map(str, c['world_sizes'][:6])) if isinstance(c['world_sizes'], list) else 'any'})"
                          for c in s["candidates"][:4])
        lines.append(f"scalars: [{s['length']}]: " + (cands or s.get("note", "no documented layout fits")))
    fused = info["fused"]
    for f in fused[:limit]:
        if "problem" in f:
            lines.append(f"fused:   {f['name']} {f['shape']}: cannot split: {f['problem']}")
            continue
        outs = f["outputs"]
        shown = ", ".join(outs[:4]) + (f", ... ({len(outs)} outputs)" if len(outs) > 4 else "")
        lines.append(f"{f['kind']}: {f['name']} {f['shape']} -> {shown}"
                     + (f"; drops {len(f['dropped'])} padding part(s)" if f.get("dropped") else ""))
    if len(fused) > limit:
        lines.append(f"  ... {len(fused) - limit} more fused/transposed tensors (--json for all)")
    for o in info["optimizer_layout"]:
        states = ", ".join(f"{k} x{n}" for k, n in o["states"].items())
        lines.append(f"optimizer: {o['container']}: {o['parameters']} parameters in {o['param_groups']} group(s), keyed by "
                     f"{o['keyed_by']}; param_names {'recorded' if o['param_names_recorded'] else 'not recorded'}; {states}"
                     + (f"; {o['moments_matching_no_parameter']} state tensor(s) match no parameter shape (partial?)"
                        if o["moments_matching_no_parameter"] else ""))
    for problem in a.get("problems", []):
        lines.append(f"problem: {problem}")
    return lines
