"""Fault injection for tests that run shardfix in another process (the CLI, a Ray job).

Put this directory on ``PYTHONPATH`` and set ``SHARDFIX_TEST_PID_DIR``, ``SHARDFIX_TEST_TASK_DELAY`` or
``SHARDFIX_TEST_FAIL_ONCE_DIR``: Python imports this module at start-up, and it makes every
``shardfix.api.convert`` call of that process pass the matching :class:`shardfix.execute.Faults`.
shardfix itself never reads these variables; only this test hook does.
"""

from __future__ import annotations

import functools
import os

_ENV = {"pid_dir": "SHARDFIX_TEST_PID_DIR", "delay": "SHARDFIX_TEST_TASK_DELAY", "fail_once_dir": "SHARDFIX_TEST_FAIL_ONCE_DIR"}
_values = {k: os.environ.get(v) for k, v in _ENV.items()}

if any(_values.values()):
    import shardfix.api
    from shardfix.execute import Faults

    _faults = Faults(pid_dir=_values["pid_dir"], delay=float(_values["delay"] or 0), fail_once_dir=_values["fail_once_dir"])
    shardfix.api.convert = functools.partial(shardfix.api.convert, faults=_faults)
