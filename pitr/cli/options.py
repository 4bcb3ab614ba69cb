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
