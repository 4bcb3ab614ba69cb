"""How every command presents itself: example lines, metavars and option panels, in one place.

The click commands typer builds for pitr are PitrCommand (set on each registered command by
`dress()`), which takes its placeholders and panels from the tables below; `--help`, `pitr help`
and the man page (cli/helpcmd.py) all render these same objects. Conventions:

- metavars are upper-case placeholders (PATH, DIR, N, ID, TS, DURATION, SECONDS, CONNINFO); the
  same option has the same placeholder in every command. A literal the user types as is (only
  `--target immediate`) stays lower-case. METAVARS is the one home of a listed option's placeholder
  (its declarations carry no metavar=); an option not in it takes its declared one, else one from its
  type, which tests/test_cli_help.py refuses to let reach the help as TEXT.
- panels group the options of the commands that have many (PANELLED); a command's own table
  entry (`command:option`) beats the option's general one.
- help is rendered by click's plain formatter, not rich: it must read the same in a pipe, a man
  page and `pitr help`, and the `[env X]` / `[default …]` notes in the help texts would be taken
  for rich markup and vanish.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

# option -> placeholder, the same in every command
METAVARS: dict[str, str] = {
    "--repo": "URL", "--config": "PATH", "--s3-endpoint": "URL", "--log-file": "PATH",
    "--dbname": "CONNINFO", "--pgdata": "DIR", "--pg-bin": "DIR", "--jobs": "N", "--backup": "ID",
    "--type": "TYPE", "--compress": "ALGO[:LEVEL]", "--timeout": "SECONDS", "--archive-timeout": "SECONDS",
    "--replay-timeout": "SECONDS", "--amcheck-timeout": "SECONDS", "--max-rpo": "DURATION", "--max-backup-age": "DURATION",
    "--max-drill-age": "DURATION", "--retain-full": "N", "--retain-days": "DAYS", "--new-key-file": "PATH",
    "--textfile": "PATH", "--repo-as-of": "TS", "--since": "TS", "--until": "TS", "--target-time": "TS",
    "--lock-days": "N", "--lock-mode": "MODE", "--prefetch": "N", "--relfilenode": "N", "--format": "FORMAT",
}
# the value's type (typer's bare_type(), or click's type name on older typer) -> placeholder
_BY_TYPE = {"int": "N", "integer": "N", "float": "NUMBER", "path": "PATH", "Path": "PATH"}
LITERAL_METAVARS = frozenset({"immediate"})  # values typed as they are, not placeholders

# option (or "command:option") -> panel, for the commands in PANELLED
PANELS: dict[str, str] = {
    **dict.fromkeys(("--target-time", "--target-lsn", "--target-xid", "--target-name", "--target",
                     "--target-exclusive", "--target-action", "--target-timeline", "--random-target",
                     "--backup", "--since", "--until"), "Target"),
    **dict.fromkeys(("--pgdata", "--delta", "--db-include", "--tablespace-map", "--archive-mode", "--prefetch",
                     "--replay", "--replay-timeout", "--pg-bin", "--keep"), "Restore"),
    **dict.fromkeys(("--check", "--check-file", "--check-db", "--no-amcheck", "--amcheck-timeout", "--max-rpo", "--max-backup-age",
                     "--max-drill-age", "--storage", "--timeout"), "Checks"),
    **dict.fromkeys(("--dbname", "backup:--pgdata", "--table", "--db", "--relfilenode", "--where"), "Server"),
    **dict.fromkeys(("--type", "--compress", "--fast", "--archive-timeout", "--checksum"), "Backup"),
    **dict.fromkeys(("--repo-as-of",), "Repository"),
    **dict.fromkeys(("--jobs",), "Performance"),
    **dict.fromkeys(("--json", "--dry-run", "--to", "--format", "--into-table"), "Output"),
}
PANEL_ORDER = ("Target", "Restore", "Backup", "Server", "Checks", "Repository", "Performance", "Output", "Options")
PANELLED = frozenset({"restore", "backup", "check", "drill", "extract", "find-target"})

# command -> example lines (shell commands, or the postgresql.conf line that runs it)
EXAMPLES: dict[str, tuple[str, ...]] = {
    "init": ("pitr --repo s3://my-bucket/prod-main init",
             "pitr init --encrypt        # key from encryption_key_file or PITR_ENCRYPTION_PASSPHRASE"),
    "wal-push": ("archive_command = 'pitr wal-push %p'        # postgresql.conf",
                 "pitr --log-file /var/log/pitr/pitr.log wal-push %p   # with a log for the archiver"),
    "archive-command": ("pitr --config /etc/pitr/pitr.toml archive-command   # paste its line into postgresql.conf",),
    "wal-fetch": ("restore_command = 'pitr wal-fetch %f %p'   # postgresql.conf (pitr restore writes it)",),
    "backup": ("pitr backup --jobs 4", "pitr backup --json | jq -r .id"),
    "restore-point": ("pitr restore-point before_upgrade",),
    "restore": ("pitr restore --pgdata /srv/pg/copy --target-time '2026-01-31 14:02:00+00' --replay",
                "pitr restore --pgdata /var/lib/postgresql/15/main --delta --target-name before_upgrade --dry-run"),
    "info": ("pitr info", "pitr info --json | jq .rpo_seconds"),
    "list": ("pitr list",),
    "verify": ("pitr verify", "pitr verify --backup 20261125T221530F"),
    "check": ("pitr check                                     # after setup: archiving works end to end",
              "pitr check --max-rpo 5m --max-backup-age 26h   # monitoring: exit 1 when late"),
    "expire": ("pitr expire --retain-full 2 --dry-run", "pitr expire --retain-days 14"),
    "key-rotate": ("pitr key-rotate --new-key-file /etc/pitr/new.key",),
    "drill": ("pitr drill --random-target --check 'SELECT count(*) > 0 FROM invoices' --json",
              "pitr drill --target-time '2026-01-31 14:00:00+00' --keep"),
    "metrics": ("pitr metrics --textfile /var/lib/node_exporter/textfile/pitr.prom",),
    "find-target": ("pitr find-target --table public.invoices --since '2026-01-31 13:00:00+00'",),
    "extract": ("pitr extract --table public.invoices --target-xid 1234 --target-exclusive "
                "--into-table invoices_recovered",
                "pitr extract --table public.invoices --target-time '2026-01-31 14:02:00+00' --to invoices.csv"),
    "help": ("pitr help restore", "pitr help --man > /usr/local/share/man/man1/pitr.1"),
}


def epilog(command: str) -> str | None:
    """The Examples block of a command's help (\\b keeps click from re-wrapping the lines)."""
    lines = EXAMPLES.get(command)
    if not lines:
        return None
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


def metavar_of(param: Any) -> str | None:
    """The placeholder an option or argument shows, by the conventions above."""
    if param.param_type_name == "argument":
        return str(param.name).upper()
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return None
    long = next((o for o in param.opts if o.startswith("--")), param.opts[0])
    if long in METAVARS:
        return METAVARS[long]
    if param.metavar and (param.metavar.isupper() or param.metavar in LITERAL_METAVARS):
        return str(param.metavar)
    kind = param.bare_type() if hasattr(param, "bare_type") else getattr(param.type, "name", "")
    return _BY_TYPE.get(str(kind).removeprefix("list[").removesuffix("]"), "TEXT")


def panel_of(command: str, param: Any) -> str | None:
    if command not in PANELLED or param.param_type_name != "option":
        return None
    long = next((o for o in param.opts if o.startswith("--")), param.opts[0])
    return PANELS.get(f"{command}:{long}") or PANELS.get(long)


def polish(command: str, params: list[Any]) -> None:
    """Apply the metavar and panel conventions to a command's click parameters."""
    for p in params:
        mv = metavar_of(p)
        if mv is not None:
            p.metavar = mv
        panel = panel_of(command, p)
        if panel is not None:
            p.rich_help_panel = panel


class PitrCommand(TyperCommand):
    """A typer command with pitr's metavars, and its options grouped into panels in plain help too."""

    def __init__(self, name: str | None, **kw: Any) -> None:
        super().__init__(name, **kw)
        polish(name or "", self.params)

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        """`[OPTIONS] NAME DEST` (an optional argument in brackets), as in the man pages of other tools."""
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if p.param_type_name == "argument":
                name = f"{p.metavar}..." if p.nargs != 1 else str(p.metavar)
                pieces.append(name if p.required else f"[{name}]")
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        args: list[tuple[str, str]] = []
        panels: dict[str, list[tuple[str, str]]] = {}
        for p in self.get_params(ctx):
            if p.param_type_name == "argument":
                args.append((str(p.metavar), getattr(p, "help", None) or ""))
                continue
            rec = p.get_help_record(ctx)
            if rec is not None:
                panels.setdefault(getattr(p, "rich_help_panel", None) or "Options", []).append(rec)
        if args:
            with formatter.section("Arguments"):
                formatter.write_dl(args)
        for name in sorted(panels, key=lambda n: PANEL_ORDER.index(n) if n in PANEL_ORDER else len(PANEL_ORDER)):
            with formatter.section(name):
                formatter.write_dl(panels[name])


class PitrGroup(TyperGroup):
    """The `pitr` group: its global options follow the same metavar convention."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        polish("", self.params)


def dress(app: typer.Typer) -> None:
    """Make every registered command a PitrCommand with its Examples epilog (call after registration)."""
    for info in app.registered_commands:
        if info.cls in (None, TyperCommand):  # typer fills in its own class when none is given
            info.cls = PitrCommand
        if info.epilog is None and info.name:
            info.epilog = epilog(info.name)
