#!/usr/bin/env bash
# Set everything up and run the whole test suite: ./scripts/test.sh [pytest args]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"

ensure_venv
install_project dev
fetch_models
cd "$REPO"
exec "$VENV/bin/python" -m pytest "$@"
