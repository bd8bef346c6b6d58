"""Planning: from a source index, options and targets to a :class:`Plan` -- every output tensor as
read ops plus transforms, grouped into output files, and a ledger entry for every source entry.

Pure and metadata-only (``evidence`` is the one stage that reads a few tensors, after planning).
May import: ``sources`` (index types), ``reconcile``, ``targets``, ``inspect`` (profiles), ``outputs``
(the layout's file names). Never ``execute``, ``report`` or ``verify``.
"""

from shardfix.plan.build import build_plan
from shardfix.plan.types import (
    COMPANIONS,
    MODEL,
    OPTIMIZER,
    PARTIAL_ROWS_KEY,
    SET_PREFIX,
    LedgerEntry,
    ModelTensor,
    OutputFile,
    OutputTensor,
    Plan,
    pack_in_order,
)

__all__ = ["COMPANIONS", "MODEL", "OPTIMIZER", "PARTIAL_ROWS_KEY", "SET_PREFIX", "LedgerEntry", "ModelTensor",
           "OutputFile", "OutputTensor", "Plan", "build_plan", "pack_in_order"]
