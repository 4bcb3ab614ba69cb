#!/usr/bin/env bash
# Run pitr's test suite on this machine (installs what is missing first): mypy over pitr and tests
# (settings in pyproject.toml; a type error stops here), then pytest. Extra arguments go to pytest.
# pytest runs in PITR_TEST_WORKERS processes (pytest-xdist; default 2, whole files per worker so that a
# module's shared clusters are built once); PITR_TEST_WORKERS=0, or your own -n, runs as you say.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$("$ROOT/scripts/setup.sh" | tail -n 1)
cd "$ROOT"
export PITR_TEST_VENV="$VENV"
"$VENV/bin/python" -m mypy --no-error-summary >&2 || { echo "test.sh: mypy found type errors (above)" >&2; exit 1; }
workers=(-n "${PITR_TEST_WORKERS:-2}" --dist loadfile)
for arg in "$@"; do
    case "$arg" in -n|-n*|--numprocesses|--numprocesses=*|--dist|--dist=*) workers=() ;; esac
done
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "${workers[@]}" "$@"
