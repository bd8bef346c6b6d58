"""Checks on a finished plan: names that cannot be written, and output far larger than the input.

* **Output names.** A safetensors header is a JSON object whose keys are tensor names, with one
  reserved key, ``__metadata__``; names must be valid UTF-8. A source key that would become the
  output name ``__metadata__`` (it would replace the file's metadata) or that holds a lone
  surrogate (not encodable, so the safetensors library refuses the file) is an error naming it:
  shardfix does not invent a new name for a tensor on its own. Every other name -- including
  names starting with ``__`` -- is written as it is.
* **Output size.** The plan's output bytes are the sum of its tensors' bytes; the input's are
  the bytes of its files. A checkpoint can declare far more than it holds (one small storage
  viewed by many tensors, a stride-0 record of a huge box, ``--allow-grow`` to a huge target),
  so output more than :data:`GROWTH_FACTOR` times the input (plus :data:`GROWTH_SLACK`) gives a
  warning naming both sizes and the largest tensors; ``--strict`` turns it into exit 3.
* **Growth.** Every tensor grown by ``--allow-grow`` is named in a warning with its row counts.
"""

from __future__ import annotations

from shardfix.errors import BadInputError
from shardfix.io.units import format_bytes
from shardfix.plan.types import OutputFile

RESERVED = "__metadata__"
#: Output bytes above ``GROWTH_FACTOR * input + GROWTH_SLACK`` give a warning.
GROWTH_FACTOR = 4
GROWTH_SLACK = 64 << 20


def check_output_names(files: list[OutputFile]) -> None:
    """Raise naming the first output tensor whose name safetensors cannot hold.

    Raises:
        BadInputError: a name is ``__metadata__`` or is not valid UTF-8 (a lone surrogate).
    """
    for f in files:
        for t in f.tensors:
            if t.name == RESERVED:
                raise BadInputError(f"{t.source}: would be written as {RESERVED!r}, the key safetensors reserves for "
                                    "the file's metadata; rename the key in the checkpoint (no tensor was written)")
            try:
                t.name.encode("utf-8")
            except UnicodeEncodeError:
                raise BadInputError(f"{t.source!r}: a key that is not valid UTF-8 (it holds a lone surrogate), so no "
                                    "safetensors file can name it; rename the key in the checkpoint") from None


def size_warnings(files: list[OutputFile], input_bytes: int) -> list[str]:
    """Warnings for output far larger than ``input_bytes``, and for every grown tensor."""
    out: list[str] = []
    tensors = [t for f in files for t in f.tensors]
    for t in tensors:
        for op in t.ops:
            if op.get("op") == "grow":
                out.append(f"{t.name}: --allow-grow adds rows to dim {op.get('dim')} (to {op.get('length')}); the new "
                           f"rows are invented ({op.get('fill')}), not read from the checkpoint")
    total = sum(t.nbytes for t in tensors)
    if total > GROWTH_FACTOR * input_bytes + GROWTH_SLACK:
        big = sorted(tensors, key=lambda t: -t.nbytes)[:3]
        names = ", ".join(f"{t.name} ({format_bytes(t.nbytes)})" for t in big)
        out.append(f"the output is {format_bytes(total)} but the checkpoint's files hold {format_bytes(input_bytes)}: "
                   f"the checkpoint declares far more than it stores (shared or stride-0 storage, or grown dims); "
                   f"largest: {names}. Check the source; --strict refuses this")
    return out
