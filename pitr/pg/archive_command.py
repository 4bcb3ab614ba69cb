"""archive_command as a shell one-liner: acknowledge what the async archiver stored without a Python start.

In async mode (the default) the archiver helper pushes every `.ready` file ahead of PostgreSQL's
calls and writes NAME.ok once the object is durable and verified; each `pitr wal-push %p` then
only reads that marker, yet costs a Python start (~50 ms of CPU) that a busy server's archiver
pays per segment, in series, beside the helper's compression. The line `pitr archive-command`
prints does that reading in /bin/sh: it waits (bounded) while a helper runs for NAME.ok, and
exits 0 only when the marker's `sh=TOKEN:IDENTITY` line names this token and this very file
(device, inode, size and mtime to the nanosecond, from GNU `stat`). Anything else — no helper,
an error marker, another file, a stat without `%.9Y`, the bound — runs `pitr wal-push %p`, which
decides exactly as it always did (docs/runbook.md §2).

The helper writes the `sh=` line only when it was started by this line's fallback with the
options the token digests, and only while its config file and the server it was started under
(whose environment it has) are unchanged (ops/wal/pushd.shell_ok_check).
"""

from __future__ import annotations

from collections.abc import Sequence

from pitr.pg.recovery import shell_word

TOKEN_ENV = "PITR_ARCHIVE_TOKEN"  # the async archiver reads it (cli/asyncwal._shell_token)
DEFAULT_SPOOL = "pg_wal/pitr_spool"  # = ops/wal/spool.ARCHIVE_SPOOL under pg_wal (archive_command runs in PGDATA)
EXITED = "pushd.exited"  # = spool.PUSHD_EXITED
LOCK = "pushd.lock"  # = spool.PUSHD's lock
WAIT_POLLS = 150  # x WAIT_SLEEP: ~3 s for a file being pushed, then `pitr wal-push` waits on
WAIT_SLEEP = "0.02"


def render_archive_command(pitr_argv: Sequence[str], global_args: Sequence[str], token: str,
                           spool_dir: str | None = None) -> str:
    """The one-liner; `pitr_argv global_args wal-push %p` (with TOKEN_ENV=token) is its fallback.

    spool_dir: the archive spool when spool_path is set (absolute), else pg_wal/pitr_spool.
    `%` other than %p/%f is doubled: PostgreSQL substitutes the line before /bin/sh reads it.
    """
    d = shell_word(spool_dir or DEFAULT_SPOOL)
    fallback = " ".join([f"{TOKEN_ENV}={shell_word(token)}", *(shell_word(w) for w in [*pitr_argv, *global_args]),
                         "wal-push", "%p"])
    # a subshell whose status is the answer: no `exit` leaves a script the line is embedded in
    check = (f"( d={d}; [ -e \"$d/{LOCK}\" ] && [ ! -e \"$d/{EXITED}\" ] || exit 2; n=0; "
             f"while [ ! -e \"$d/%f.ok\" ]; do {{ [ -e \"$d/%f.error\" ] || [ -e \"$d/{EXITED}\" ] || "
             f"[ $((n+=1)) -gt {WAIT_POLLS} ]; }} && exit 2; sleep {WAIT_SLEEP}; done; "
             f"i=$(stat -c %%d:%%i:%%s:%%.9Y %p) || exit 2; "
             f"while read -r l; do [ \"$l\" = \"sh={token}:$i\" ] && exit 0; done < \"$d/%f.ok\"; exit 2 )")
    return f"{check} 2>/dev/null || {fallback}"
