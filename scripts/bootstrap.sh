# Sourced by scripts/demo and scripts/test: creates .venv in the checkout on
# first use (or when pyproject.toml changed) and activates it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.raypipe-installed"
PY="${PYTHON:-python3}"
# The CPU wheel of torch keeps the venv small; set RAYPIPE_TORCH to choose another.
TORCH_SPEC="${RAYPIPE_TORCH:-torch==2.13.0}"
# Pinned versions of the dependencies (the ones cluster.yaml's nodes install).
CONSTRAINTS="$ROOT/scripts/constraints.txt"
want="$(cat "$ROOT/pyproject.toml" "$CONSTRAINTS" | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  echo "raypipe: setting up $VENV (first run takes about a minute)" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch in the same command as the rest, so no dependency pulls a CUDA build.
  "$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" "$TORCH_SPEC" -e "$ROOT[dev]"
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
export RAY_USAGE_STATS_ENABLED=0
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
cd "$ROOT"
