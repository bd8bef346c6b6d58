# Sourced by scripts/*: create the project's virtualenv once and install what it needs.
# torch==2.13.0 is installed first when torch is missing (an unpinned torch would pull several
# GB of CUDA packages); an existing torch is left alone. Idempotent: reruns install nothing new.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SHARDFIX_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==2.13.0 (CPU)" >&2
  pip install -q torch==2.13.0 || { echo "setup: pip install torch==2.13.0 failed" >&2; exit 1; }
fi
stamp="$VENV/.shardfix-$(cat "$ROOT/pyproject.toml" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing shardfix and its test dependencies" >&2
  log="$VENV/install.log"
  if ! pip install -q -e "$ROOT[test]" >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup: installing shardfix failed (log above, also in $log)" >&2
    exit 1
  fi
  touch "$stamp"
fi
cd "$ROOT"
