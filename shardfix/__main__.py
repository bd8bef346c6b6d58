"""``python -m shardfix`` runs the CLI."""

import sys

from shardfix.cli import main

sys.exit(main())
