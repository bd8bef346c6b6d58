"""Read Megatron's ``common.pt`` (the non-sharded part of a ``torch_dist`` save) without running code.

``common.pt`` is a ``torch.save`` zip. Listed with ``pickletools``, a genuine one (megatron-core
0.16: iteration, ``checkpoint_version``, the optimizer's param groups and
``param_state_sharding_type``) references no global at all: only dicts, lists, tuples, numbers,
strings, booleans and None. So it is loaded with ``torch.load(weights_only=True)``, torch's own
restricted unpickler, and anything that unpickler refuses is refused here too, naming the
global. Megatron does not need to be installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from shardfix.errors import BadInputError, UnsafeInputError
from shardfix.io.regular import check_regular
from shardfix.io.safe_pickle import is_weights_only_refusal, refused_global

MAX_COMMON_BYTES = 1 << 28


def load_common(path: Path) -> Any:
    """The content of ``common.pt`` as plain Python data.

    Raises:
        BadInputError: missing, too large or corrupt.
        UnsafeInputError: it references any global (a genuine one references none).
    """
    if not path.exists():
        raise BadInputError(f"{path}: missing; copy the whole iter_ directory")
    size = check_regular(path).st_size
    if size > MAX_COMMON_BYTES:
        raise BadInputError(f"{path}: {size} bytes is far larger than Megatron's common.pt; refusing to load it")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        if not is_weights_only_refusal(e):
            raise BadInputError(f"{path}: cannot read ({type(e).__name__}: {str(e)[:200]})") from e
        refused = e
    raise UnsafeInputError(
        f"{path}: refuses to load {refused_global(refused)}: Megatron's common.pt holds only plain values "
        "(numbers, strings, tuples, dicts, lists), so this file is not a genuine checkpoint or was crafted to run code. "
        "Nothing was executed."
    )
