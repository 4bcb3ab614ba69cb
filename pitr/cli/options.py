"""Option declarations several commands share word for word: one home for their flag, help and placeholder.

An option whose help is worded for its command (--target-time in restore, drill and extract, --jobs,
--pg-bin ...) stays declared in that command; helpdoc.METAVARS keeps its placeholder the same everywhere.
"""

from __future__ import annotations

from typing import Annotated

import typer

# every command that takes a running server: `--dbname` is libpq's conninfo, env vars included
DbName = Annotated[str | None, typer.Option("--dbname", "-d", help="libpq conninfo of the running server [libpq env].", show_default=False)]
# the result of a command that does one thing (commands with a documented report word their own)
JsonResult = Annotated[bool, typer.Option("--json", help="Machine-readable result on stdout.")]
# info and its alias list
JsonReport = Annotated[bool, typer.Option("--json", help="Machine-readable report on stdout (docs/info-json.md).")]
# info and verify read a versioned bucket as of a moment (restore and drill word it for what they do)
RepoAsOf = Annotated[str | None, typer.Option("--repo-as-of", help="Read the versioned S3 bucket as it was at TS [env PITR_REPO_AS_OF].", show_default=False)]
# the commands that restore (restore, drill, extract): which backup, how many file workers, which binaries
RestoreBackup = Annotated[str | None, typer.Option("--backup", help="Restore this backup ID instead of choosing one.", show_default=False)]
RestoreJobs = Annotated[int | None, typer.Option("--jobs", "-j", help="Parallel file workers [default 2].", show_default=False)]
PgBin = Annotated[str | None, typer.Option("--pg-bin", help="PostgreSQL bin directory [default: found by version].", show_default=False)]
# find-target and extract: the database of --table
TableDb = Annotated[str | None, typer.Option("--db", metavar="NAME", help="The table's database [default: the one --dbname connects to].", show_default=False)]
