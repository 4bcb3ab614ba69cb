#!/usr/bin/env bash
# Runs once, on the first start of an empty data volume (docker-entrypoint-initdb.d), as the
# postgres user while the entrypoint's temporary server is up: bind the repository to this new
# cluster. archive_command is already on; its first pushes fail (and PostgreSQL retries them)
# until this has run, which is a few seconds at most.
set -euo pipefail
echo "pitr-init: binding ${PITR_REPO:-<PITR_REPO not set>} to this cluster"
pitr init
