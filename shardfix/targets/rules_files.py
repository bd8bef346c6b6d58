"""Readers of the files that say what the user wants: ``--key-map`` (TOML) and ``--param-names``.

They live here, not in ``reconcile/`` (whose rules are pure), and return the plain data the
rules take.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from shardfix.errors import BadInputError
from shardfix.reconcile.fused import KeyMap


def read_key_map(path: str) -> KeyMap:
    """Read a ``--key-map`` TOML file.

    Format: top-level keys are source names after prefix stripping, ``{i}`` standing for a
    layer index; each value is a list of output names, one per piece in the profile's order
    (``"none"`` drops that piece), a single string (a rename), or ``[]`` (drop the tensor)::

        "blocks.{i}.attn.qkv_w" = ["model.layers.{i}.self_attn.q_proj.weight", "...k_proj.weight", "...v_proj.weight"]
        "embed.weight" = "model.embed_tokens.weight"
        "scalars" = []
    """
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except OSError as e:
        raise BadInputError(f"--key-map: cannot read {p} ({e.strerror})") from e
    except tomllib.TOMLDecodeError as e:
        raise BadInputError(f"--key-map: {p} is not valid TOML ({e}); quote keys that contain dots") from e
    entries = []
    for key, value in data.items():
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BadInputError(f"--key-map: {p}: {key!r} must map to a list of output names (or \"none\"), got {value!r}")
        entries.append((key, tuple(value)))
    return KeyMap(str(p), tuple(entries))


def read_param_names(path: str) -> list[str] | list[list[str]]:
    """Read ``--param-names``.

    Accepted: a JSON list of names; a JSON list of lists (one per optimizer of an
    ``optimizers`` list); a JSON object ``{"param_names": [...]}`` or ``{"optimizers": [[...],
    ...]}``; or plain text, one name per line (``#`` starts a comment line). A flat list with
    several optimizers is their parameters one optimizer after the other, each in param-group
    order.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise BadInputError(f"--param-names: cannot read {p} ({e.strerror})") from e
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        try:
            data = json.loads(stripped)
        except ValueError as e:
            raise BadInputError(f"--param-names: {p} is not valid JSON ({e})") from e
        if isinstance(data, dict):
            data = data.get("param_names", data.get("names", data.get("optimizers")))
        if isinstance(data, list) and data and all(isinstance(x, list) for x in data):
            if all(isinstance(n, str) for x in data for n in x):
                return data
        if not isinstance(data, list) or not all(isinstance(n, str) for n in data):
            raise BadInputError(
                f"--param-names: {p} must hold a JSON list of parameter names (or one list per optimizer)"
            )
        return data
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
