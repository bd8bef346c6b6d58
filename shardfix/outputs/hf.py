"""The Hugging Face safetensors layout: ``model.safetensors`` or ``model-0000i-of-0000N.safetensors``
plus ``model.safetensors.index.json`` (``{"metadata": {"total_size"}, "weight_map"}``); the same for
``optimizer`` and ``companions``; a PEFT adapter as ``adapter/adapter_model.safetensors`` (always one
file: PEFT reads no index); sidecars ``optimizer_param_groups.json`` and those of a Hugging Face model
directory (``config.json``, ``generation_config.json``, tokenizer files, ``adapter/adapter_config.json``).
"""

from __future__ import annotations

from pathlib import Path

from shardfix.outputs.layout import ADAPTER, OPTIMIZER, SetFiles, Sidecar
from shardfix.outputs.sidecars import stage
from shardfix.outputs.writer import index_json, write_json_atomic

NAME = "hf"
PARAM_GROUPS_NAME = "optimizer_param_groups.json"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = f"{ADAPTER_DIR}/adapter_model.safetensors"
ADAPTER_CONFIG = f"{ADAPTER_DIR}/adapter_config.json"


class HFSafetensorsLayout:
    """See the module docstring."""

    name = NAME

    def file_names(self, set_name: str, count: int) -> list[str]:
        if set_name == ADAPTER:
            if count != 1:
                raise ValueError(f"the adapter is written as one file (PEFT reads no index), not {count}")
            return [ADAPTER_WEIGHTS]
        if count == 1:
            return [f"{set_name}.safetensors"]
        return [f"{set_name}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]

    def index_name(self, set_name: str) -> str:
        return f"{set_name}.safetensors.index.json"

    def sidecar_names(self) -> tuple[str, ...]:
        return (PARAM_GROUPS_NAME, "config.json", "generation_config.json", ADAPTER_CONFIG)

    def param_groups_sidecar(self, param_groups: list[dict[str, object]]) -> Sidecar:
        return Sidecar(PARAM_GROUPS_NAME, {"param_groups": param_groups}, f"{OPTIMIZER} param groups")

    def finish(self, out: Path, sets: list[SetFiles], sidecars: list[Sidecar]) -> list[str]:
        written = []
        for s in sets:
            if len(s.files) > 1:
                name = self.index_name(s.set)
                write_json_atomic(out / name, index_json(dict(s.weight_map), s.total_size))
                written.append(name)
        for side in sidecars:  # written, fsynced and hashed like the data files; the session moves them into OUT
            stage(out, side)
            written.append(side.name)
        return written


LAYOUT = HFSafetensorsLayout()
