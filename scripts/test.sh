#!/usr/bin/env bash
# Run pitr's test suite on this machine (installs what is missing first): mypy over pitr and tests
# (settings in pyproject.toml; a type error stops here), then pytest. Extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$("$ROOT/scripts/setup.sh" | tail -n 1)
cd "$ROOT"
export PITR_TEST_VENV="$VENV"
"$VENV/bin/python" -m mypy --no-error-summary >&2 || { echo "test.sh: mypy found type errors (above)" >&2; exit 1; }
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
