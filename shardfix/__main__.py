"""``python -m shardfix`` runs the CLI.

``python -m`` puts the working directory first on ``sys.path``; a checkpoint directory holding,
say, ``zstandard.py`` would then shadow a real module. shardfix is already imported at this point,
so the entry is dropped before anything else is imported (input is data, never code).
"""

import os
import sys

if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from shardfix.cli import main  # noqa: E402

sys.exit(main())
