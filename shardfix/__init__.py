"""shardfix: turn distributed-training checkpoints into clean, reconciled safetensors.

Public API:
    :func:`shardfix.api.convert` -- plan and execute a conversion.
    :func:`shardfix.api.inspect_source` / :func:`shardfix.api.plan_conversion` -- describe or plan.
    :func:`shardfix.optim_load.load_optimizer_state` -- restore written state by name.
"""

from __future__ import annotations

from shardfix.version import __version__

__all__ = ["__version__", "convert", "load_optimizer_state", "plan_conversion"]


def __getattr__(name: str):  # lazy: keep `import shardfix` light for the CLI and Ray workers
    if name in ("convert", "plan_conversion"):
        from shardfix import api

        return getattr(api, name)
    if name == "load_optimizer_state":
        from shardfix.outputs.restore import load_optimizer_state

        return load_optimizer_state
    raise AttributeError(name)
