#!/usr/bin/env bash
# Build the CPU test environment of the ipex-llm backend.
#
#   scripts/make_ipex_llm_venv.sh [VENV_DIR]        (default: <project root>/.venv-ipex-llm)
#
# The stack (ipex-llm 2.2.0 + transformers 4.45 + TRL 0.11.4 + peft 0.10) cannot be resolved by pip
# in one go: ipex-llm 2.2.0 pins torch 2.1 / transformers 4.37 / accelerate 0.23. So:
#   1. torch (CPU) first,
#   2. requirements/ipex-llm-cpu.txt with torch held by a constraint (pip must never swap torch:
#      a PyPI torch for Linux pulls gigabytes of CUDA),
#   3. ipex-llm with --no-deps,
#   4. an import check,
#   5. the project itself, --no-deps -e (last: it fails until the package is importable).
# Idempotent: a marker in the venv holds a hash of the inputs; when it matches and the project is
# installed, nothing is done.
#
# Environment: PYTHON (default python3), TORCH_VERSION (2.13.0), IPEX_LLM_VERSION (2.2.0),
# TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu; default: pip's configured indexes),
# FORCE=1 to rebuild the packages even when the marker matches.
# This is the CPU test environment; for Intel GPUs use environment-ipex-llm.yml.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-ipex-llm}"
mkdir -p "$VENV"
VENV="$(cd "$VENV" && pwd)"   # absolute: the import check below runs from inside the venv folder
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
IPEX_LLM_VERSION="${IPEX_LLM_VERSION:-2.2.0}"
REQ="$ROOT/requirements/ipex-llm-cpu.txt"
MARKER="$VENV/.dpo_xpu-ipex-llm-env"

log() { printf '[make_ipex_llm_venv] %s\n' "$*" >&2; }

[[ -f "$REQ" ]] || { log "missing $REQ"; exit 2; }

inputs_hash() {
    {
        cat "$REQ"
        echo "torch==$TORCH_VERSION ipex-llm==$IPEX_LLM_VERSION index=${TORCH_INDEX_URL:-}"
        "$PYTHON" -c 'import sys; print(sys.version_info[:2])'
    } | sha256sum | cut -d' ' -f1
}
HASH="$(inputs_hash)"
PY="$VENV/bin/python"
pip_() { "$PY" -m pip --disable-pip-version-check "$@"; }

project_installed() { pip_ show dpo_xpu >/dev/null 2>&1; }

if [[ "${FORCE:-0}" != 1 && -x "$PY" && -f "$MARKER" && "$(cat "$MARKER")" == "$HASH" ]]; then
    if project_installed; then
        log "$VENV is up to date (marker $HASH)"
        exit 0
    fi
    log "$VENV packages are up to date; installing the project only"
else
    start=$SECONDS
    [[ -x "$PY" ]] || { log "creating $VENV with $PYTHON"; "$PYTHON" -m venv "$VENV"; }
    rm -f "$MARKER"

    log "installing torch==$TORCH_VERSION (CPU)"
    torch_args=()
    [[ -n "${TORCH_INDEX_URL:-}" ]] && torch_args=(--index-url "$TORCH_INDEX_URL")
    pip_ install "${torch_args[@]}" "torch==$TORCH_VERSION"
    if "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)'; then :; else
        log "warning: a CUDA build of torch was installed; set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
    fi

    constraints="$(mktemp)"
    trap 'rm -f "$constraints"' EXIT
    echo "torch==$TORCH_VERSION" >"$constraints"
    log "installing $REQ (torch held at $TORCH_VERSION)"
    pip_ install -r "$REQ" -c "$constraints"

    log "installing ipex-llm==$IPEX_LLM_VERSION without its dependencies"
    pip_ install --no-deps "ipex-llm==$IPEX_LLM_VERSION"

    log "checking the imports"
    (cd "$VENV" && BIGDL_IMPORT_IPEX=0 "$PY" - <<'EOF'
import ipex_llm
from ipex_llm.transformers import AutoModelForCausalLM
from ipex_llm.transformers.qlora import get_peft_model, prepare_model_for_kbit_training
import trl
from trl import DPOTrainer, DPOConfig
import datasets, peft, transformers, accelerate, torch
print("ok: torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__,
      "peft", peft.__version__, "accelerate", accelerate.__version__, "datasets", datasets.__version__)
EOF
    )
    echo "$HASH" >"$MARKER"
    log "packages installed in $((SECONDS - start)) s"
fi

log "installing the project (pip install --no-deps -e $ROOT)"
pip_ install --no-deps -e "$ROOT"
log "done: $VENV"
