"""The CLI's public face: shell completion, help examples and metavars, `pitr help`, --json `version`.

Runs the installed console script as a user would; no server is needed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

PITR = Path(sys.executable).parent / "pitr"
ROOT = Path(__file__).resolve().parent.parent


def pitr(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ["PATH"], "HOME": "/tmp", "LANG": "C.UTF-8", "PITR_CONFIG": "/dev/null"}
    return subprocess.run([str(PITR), *map(str, args)], env=base | (env or {}), capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def test_show_completion_prints_a_script_that_calls_pitr_back() -> None:
    r = pitr("--show-completion", "bash")
    assert r.returncode == 0, r.stderr
    assert "_PITR_COMPLETE=complete_bash" in r.stdout and "complete " in r.stdout


def test_completion_request_completes_commands_and_options() -> None:
    r = pitr(env={"_PITR_COMPLETE": "complete_bash", "COMP_WORDS": "pitr wal-", "COMP_CWORD": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["wal-push", "wal-fetch"]
    r = pitr(env={"_PITR_COMPLETE": "complete_bash", "COMP_WORDS": "pitr restore --target-ti", "COMP_CWORD": "2"})
    assert set(r.stdout.split()) == {"--target-time", "--target-timeline"}


def _click_app() -> Any:
    import typer.main

    from pitr.cli.app import app

    return typer.main.get_command(app)


PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(?:[=.:\[\]|][A-Z0-9_\[\]:.]*)*$")


def test_every_value_takes_an_upper_case_placeholder() -> None:
    from pitr.cli.helpdoc import LITERAL_METAVARS

    group = _click_app()
    bad = []
    for cname, cmd in [("", group), *group.commands.items()]:
        for p in cmd.params:
            if p.param_type_name == "option" and (p.is_flag or p.count):
                continue
            if not (p.metavar in LITERAL_METAVARS or PLACEHOLDER.match(p.metavar or "")):
                bad.append(f"{cname} {p.opts}: {p.metavar!r}")
    assert bad == []
    for cname in group.commands:  # nor does typer's own type notation reach the text
        out = pitr(cname, "--help").stdout
        assert "<str>" not in out and "<int>" not in out and "{" not in out.splitlines()[0], (cname, out)


@pytest.mark.parametrize("cmd", ["restore", "wal-push", "wal-fetch", "check", "drill", "extract"])
def test_help_shows_examples(cmd: str) -> None:
    from pitr.cli.helpdoc import EXAMPLES

    r = pitr(cmd, "--help")
    assert r.returncode == 0, r.stderr
    examples = r.stdout.split("Examples:", 1)[1]
    assert EXAMPLES[cmd] and all(line in examples for line in EXAMPLES[cmd])


@pytest.mark.parametrize("cmd", ["restore", "backup", "check", "drill"])
def test_many_options_are_grouped_in_panels(cmd: str) -> None:
    out = pitr(cmd, "--help").stdout
    sections = re.findall(r"^(\w[\w ]*):$", out, re.M)
    assert len([s for s in sections if s not in ("Options", "Examples", "Arguments")]) >= 2, out
    assert sections.count("Options") == 1  # each option shown once, the rest in its panel


def _commands() -> list[str]:
    return [n for n, c in _click_app().commands.items() if not c.hidden]


def test_pitr_help_explains_every_command_as_its_help_does() -> None:
    for name in _commands():
        r = pitr("help", name)
        assert r.returncode == 0, (name, r.stderr)
        assert r.stdout.startswith(f"Usage: pitr {name} "), (name, r.stdout)
        assert r.stdout.startswith(pitr(name, "--help").stdout.rstrip("\n")), name  # the same source
    r = pitr("help", "no-such-command")
    assert r.returncode == 2 and "no command 'no-such-command'" in r.stderr and r.stdout == ""
    assert pitr("help").stdout == pitr("--help").stdout


def test_man_page_has_every_command_and_is_valid_roff(tmp_path: Path) -> None:
    r = pitr("help", "--man")
    assert r.returncode == 0, r.stderr
    page = r.stdout
    assert page.startswith(".TH PITR 1 ")
    for name in _commands():
        assert f'.SS "pitr {name.replace("-", chr(92) + "-")} ' in page, name
    assert "\\-\\-target\\-time" in page and "Examples:" in page and ".SH EXIT STATUS" in page
    if shutil.which("groff"):
        (tmp_path / "pitr.1").write_text(page)
        g = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(tmp_path / "pitr.1")],
                           capture_output=True, text=True, timeout=60)
        assert g.returncode == 0 and g.stderr == "", g.stderr


# --------------------------------------------------------------------------- --json carries `version`

def _json_commands() -> list[str]:
    return sorted(n for n, c in _click_app().commands.items()
                  if any("--json" in p.opts for p in c.params))


def test_every_json_output_is_documented() -> None:
    doc = (ROOT / "docs" / "json.md").read_text()
    missing = [c for c in _json_commands() if f"`pitr {c} " not in doc and f"`pitr {c}`" not in doc]
    assert missing == []


def test_json_is_printed_only_by_emit_json_which_adds_the_versions(capsys: pytest.CaptureFixture[str]) -> None:
    from pitr import __version__
    from pitr.cli.render import emit_json

    # every command's --json goes through emit_json: no other JSON writer in the CLI layer
    writers = [str(p.relative_to(ROOT)) for p in (ROOT / "pitr" / "cli").glob("*.py")
               if "json.dump" in p.read_text() and p.name != "render.py"]
    assert writers == []
    emit_json({"ok": True})
    out = json.loads(capsys.readouterr().out)
    assert out == {"version": 1, "pitr_version": __version__, "ok": True}
    emit_json({"version": 3, "ok": True})  # a record with its own format version keeps it
    assert json.loads(capsys.readouterr().out)["version"] == 3


@pytest.mark.parametrize("argv", [["info", "--json"], ["list", "--json"], ["verify", "--json"],
                                  ["expire", "--retain-full", "1", "--dry-run", "--json"],
                                  ["check", "--storage", "--json"]])
def test_json_outputs_carry_version(argv: list[str], tmp_path: Path) -> None:
    from pitr import __version__
    from tests.support.walgen import fs_repo

    repo = fs_repo(tmp_path / "repo")
    r = pitr("--repo", str(repo.root), *argv)
    assert r.stdout.strip(), (argv, r.returncode, r.stderr)
    out = json.loads(r.stdout)
    assert isinstance(out["version"], int) and out["pitr_version"] == __version__, out


def test_no_option_shows_a_type_placeholder_and_metavars_have_one_home() -> None:
    """A value option shows what it takes (FORMAT, not click's TEXT), and an option in helpdoc.METAVARS
    declares no metavar of its own that could drift from the table (check's DUR vs DURATION did)."""
    import ast

    from pitr.cli.helpdoc import METAVARS

    group = _click_app()
    typed = [f"{cname} {p.opts}" for cname, cmd in [("", group), *group.commands.items()] for p in cmd.params
             if p.param_type_name == "option" and not (p.is_flag or p.count) and p.metavar in ("TEXT", "NUMBER")]
    assert typed == []
    assert "--format FORMAT" in pitr("extract", "--help").stdout
    declared = []
    for path in sorted((ROOT / "pitr" / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and ast.unparse(node.func) == "typer.Option"
                    and any(k.arg == "metavar" for k in node.keywords)
                    and any(isinstance(a, ast.Constant) and a.value in METAVARS for a in node.args)):
                declared.append(f"{path.name}:{node.lineno}")
    assert declared == []
