#!/usr/bin/env bash
# Set everything up and run the whole test suite: ./scripts/test.sh [pytest args]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"

set_up_everything
exec "$VENV/bin/python" -m pytest "$@"
