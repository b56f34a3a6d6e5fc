#!/usr/bin/env bash
# The project's test command: builds .venv if needed (scripts/setup.sh, idempotent), then runs the whole suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k masks
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/python -m pytest "$@"
