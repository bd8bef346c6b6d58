# Sourced by scripts/*: create the project's virtualenv once and install what it needs.
# torch==2.13.0 is installed first when torch is missing (an unpinned torch would pull several
# GB of CUDA packages); an existing torch is left alone, and every later install is constrained to
# the torch that is there, so no test extra can pull a second one. Idempotent: reruns install
# nothing new. SHARDFIX_EXTRAS picks the extras (default: everything the test suite uses).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SHARDFIX_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
EXTRAS=${SHARDFIX_EXTRAS:-test,test-stacks,test-hf,test-megatron}
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
stamp="$VENV/.shardfix-$( (cat "$ROOT/pyproject.toml"; echo "$EXTRAS") | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing shardfix and its test dependencies ($EXTRAS)" >&2
  log="$VENV/install.log"
  constraints="$VENV/constraints.txt"
  python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraints"
  fail() { cat "$log" >&2; echo "setup: $1 failed (log above, also in $log)" >&2; exit 1; }
  pip install -q -c "$constraints" -e "$ROOT[$EXTRAS]" >"$log" 2>&1 || fail "installing shardfix"
  if [[ ",$EXTRAS," == *",test,"* ]]; then
    # deepspeed builds from source and imports torch while building: no build isolation (it would
    # fetch another torch), and no compiled ops (DeepSpeed's CPU accelerator needs none)
    DS_BUILD_OPS=0 DS_ACCELERATOR=cpu pip install -q -c "$constraints" --no-build-isolation "deepspeed>=0.19,<0.20" \
      >>"$log" 2>&1 || fail "installing deepspeed (test-deepspeed)"
  fi
  python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith(open('$constraints').read().strip()[7:]) else 1)" \
    || { echo "setup: torch changed during setup" >&2; exit 1; }
  touch "$stamp"
fi
cd "$ROOT"
