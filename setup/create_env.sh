#!/usr/bin/env bash
# Install lingua into the current Python environment (activate your venv / conda env first).
#   bash setup/create_env.sh          # the library + tokenizers + wandb
#   bash setup/create_env.sh --dev    # + what the tests need (pytest, hypothesis, pyarrow, ...)
# torch is installed first, on its own, so pip never resolves a bare `torch` to a multi-GB CUDA build:
# CPU machines get torch==2.13.0 (TORCH_SPEC overrides; GPU users: install your CUDA build first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS="tokenizers,wandb"
[ "${1:-}" = "--dev" ] && EXTRAS="$EXTRAS,dev"
if ! $PY -c "import torch" >/dev/null 2>&1; then
    $PY -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
$PY -m pip install -q -e ".[$EXTRAS]"
$PY -c "import torch, lingua; print(f'lingua ready: torch {torch.__version__}, cuda available: {torch.cuda.is_available()}')"
