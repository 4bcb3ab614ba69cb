"""`pitr help [COMMAND]` and `pitr help --man`: the help of the commands, from the very objects --help renders.

Nothing here is written by hand twice: `pitr help restore` is `pitr restore --help` plus where the
command's full documentation lives, and `--man` turns the same click commands (their help, options
grouped by panel, examples; cli/helpdoc.py) into a roff man page, pitr(1). The page is made by the
installed pitr, so it always matches it: `pitr help --man > /usr/local/share/man/man1/pitr.1`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import typer

from pitr import __version__
from pitr.cli.helpdoc import EXAMPLES, PANEL_ORDER

# command -> the document (in the source tree's docs/) that tells the whole story
DOCS: dict[str, str] = {
    "restore": "docs/restore.md", "drill": "docs/drill.md", "extract": "docs/extract.md",
    "find-target": "docs/find-target.md", "metrics": "docs/metrics.md", "verify": "docs/maintenance.md",
    "check": "docs/maintenance.md", "expire": "docs/maintenance.md", "info": "docs/info-json.md",
    "list": "docs/info-json.md", "wal-fetch": "docs/exit-codes.md", "wal-push": "docs/runbook.md",
    "backup": "docs/runbook.md", "init": "docs/runbook.md", "key-rotate": "docs/runbook.md",
    "restore-point": "docs/restore.md", "help": "docs/json.md",
}
EXIT_STATUS = ("0 success; 1 failure (for wal-fetch: the file is not in the archive); 2 usage or configuration "
               "error; 128 wal-fetch hard failure (PostgreSQL stops recovery instead of promoting); "
               "130 interrupted. The full table is docs/exit-codes.md.")


def _sub_context(ctx: Any, name: str) -> tuple[Any, Any]:
    group = ctx.find_root().command
    cmd = group.get_command(ctx, name)
    if cmd is None:
        from pitr.errors import UsageError

        raise UsageError(f"there is no command {name!r}", "`pitr help` lists the commands")
    return cmd, type(ctx)(cmd, info_name=name, parent=ctx.find_root())


def command_help(ctx: Any, name: str) -> str:
    """What `pitr NAME --help` prints, and where its full documentation is."""
    cmd, sub = _sub_context(ctx, name)
    text = cmd.get_help(sub).rstrip("\n")
    if name in DOCS:
        text += f"\n\n  More: {DOCS[name]} in pitr's source."
    return str(text) + "\n"


# ------------------------------------------------------------------------------------------ man page

def _roff(text: str) -> str:
    """Plain text as roff: backslashes, leading dots/quotes, dashes and non-ASCII characters escaped."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)
    return re.sub(r"^([.'])", r"\\&\1", text, flags=re.M)


def _opt(rec: tuple[str, str]) -> str:
    names, help_ = rec
    return f".TP\n\\fB{_roff(names)}\\fR\n{_roff(help_)}\n"


def _records(cmd: Any, ctx: Any) -> dict[str, list[tuple[str, str]]]:
    panels: dict[str, list[tuple[str, str]]] = {}
    for p in cmd.get_params(ctx):
        if p.param_type_name == "argument":
            panels.setdefault("Arguments", []).append((str(p.metavar), getattr(p, "help", None) or ""))
            continue
        rec = p.get_help_record(ctx)
        if rec is not None and "--help" not in p.opts:
            panels.setdefault(getattr(p, "rich_help_panel", None) or "Options", []).append(rec)
    order = ("Arguments", *PANEL_ORDER)
    return dict(sorted(panels.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def _paragraphs(text: str) -> str:
    return "\n.PP\n".join(_roff(" ".join(p.split())) for p in text.split("\n\n") if p.strip())


def man_page(ctx: Any) -> str:
    """pitr(1) in roff, from the commands as registered."""
    root = ctx.find_root()
    group = root.command
    out = [f'.TH PITR 1 "" "pitr {__version__}" "User Commands"', ".SH NAME",
           "pitr \\- PostgreSQL point\\-in\\-time recovery: base backups, WAL archiving, restore to any moment",
           ".SH SYNOPSIS", ".B pitr", "[\\fIGLOBAL OPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
           ".SH DESCRIPTION", _paragraphs(group.help or ""),
           ".PP", "Global options may come before or after the command name.", ".SH GLOBAL OPTIONS"]
    for recs in _records(group, root).values():
        out += [_opt(r) for r in recs]
    out.append(".SH COMMANDS")
    for name in group.list_commands(root):
        cmd, sub = _sub_context(ctx, name)
        if cmd.hidden:
            continue
        usage = " ".join(cmd.collect_usage_pieces(sub))
        out += [f'.SS "pitr {_roff(name)} {_roff(usage)}"', _paragraphs(cmd.help or "")]
        for panel, recs in _records(cmd, sub).items():
            out += [".PP", f"\\fI{_roff(panel)}:\\fR"] + [_opt(r) for r in recs]
        if name in EXAMPLES:
            out += [".PP", "Examples:", ".RS", ".nf", *(_roff(line) for line in EXAMPLES[name]), ".fi", ".RE"]
        if name in DOCS:
            out += [".PP", f"See {_roff(DOCS[name])} in pitr's source."]
    out += [".SH EXIT STATUS", _roff(EXIT_STATUS), ".SH ENVIRONMENT",
            _roff("Every setting is also PITR_<KEY> (PITR_REPO, PITR_CONFIG, PITR_LOG_FILE, …); precedence: "
                  "option > environment > config file (/etc/pitr/pitr.toml) > default. See docs/configuration.md."),
            ".SH SEE ALSO", "\\fBpostgres\\fR(1), \\fBpg_basebackup\\fR(1)"]
    return "\n".join(out) + "\n"


def help_cmd(
    ctx: typer.Context,
    command: Annotated[str | None, typer.Argument(help="The command to explain; none: the list of commands.",
                                                  show_default=False)] = None,
    man: Annotated[bool, typer.Option("--man", help="Print the whole manual, pitr(1), as a roff man page.")] = False,
) -> None:
    """Explain a command (its --help and where its documentation is), or print the man page."""
    from pitr.cli.render import emit

    if man:
        emit(man_page(ctx))
    elif command:
        emit(command_help(ctx, command))
    else:
        root = ctx.find_root()
        emit(root.command.get_help(root))


def register(app: typer.Typer) -> None:
    app.command("help")(help_cmd)
