#!/usr/bin/env bash
# Run pitr's test suite on this machine (installs what is missing first). Extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$("$ROOT/scripts/setup.sh" | tail -n 1)
cd "$ROOT"
export PITR_TEST_VENV="$VENV"
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
