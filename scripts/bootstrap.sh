#!/usr/bin/env bash
# Sourced by serve.sh and test.sh: make .venv, install the project, fetch the real models.
# Idempotent: a second run reuses the venv, pip's wheel cache and the verified model files.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
PYTHON_BIN="${PYTHON:-python3}"

log() { printf '[setup] %s\n' "$*" >&2; }

ensure_venv() {
  if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating virtual environment in $VENV"
    "$PYTHON_BIN" -m venv "$VENV"
  fi
}

# llama_install_note: say how long installing llama-cpp-python will take: seconds if pip has the
# wheel it built before in its cache, minutes if it must compile llama.cpp.
llama_install_note() {
  local version
  version=$(grep -o 'llama-cpp-python==[0-9.]*' "$REPO/pyproject.toml" | cut -d= -f3)
  if "$VENV/bin/python" -m pip cache list "llama_cpp_python-$version-*" 2>/dev/null | grep -q "llama_cpp_python-$version-"; then
    log "installing; llama-cpp-python $version comes from the wheel in pip's cache (well under a minute)"
  else
    log "installing; the first time this compiles llama-cpp-python $version from source (about 7 minutes on 2 cores)"
  fi
}

# install_project EXTRAS: pip install -e ".[EXTRAS]"; skipped when nothing changed since last time.
install_project() {
  local extras="$1" stamp="$VENV/.model-swap-installed-$1"
  if [[ -f "$stamp" && "$stamp" -nt "$REPO/pyproject.toml" ]] && "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    log "project already installed ($extras)"
    return
  fi
  if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    llama_install_note
  fi
  # Parallel compile of llama.cpp: the build dominates the first run.
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
    --upgrade pip >/dev/null
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$VENV/bin/python" -m pip install --disable-pip-version-check \
    --progress-bar off -e "$REPO[$extras]"
  touch "$stamp"
}

fetch_models() {
  log "fetching the real models into ${MODELS_DIR:-$REPO/models} (verified by size and sha256)"
  "$VENV/bin/python" -m model_store_server.fetch_models --dest "${MODELS_DIR:-$REPO/models}"
}

# set_up_everything: venv, the project with its dev extra, the real models; then cd to the repo.
set_up_everything() {
  ensure_venv
  install_project dev
  fetch_models
  cd "$REPO"
}
