"""find-target / extract refuse bad command lines with one sentence and exit 2, before touching anything."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


@pytest.mark.parametrize(("args", "message"), [
    (["extract", "--table", "a.b", "--to", "OUT", "--into-table", "y"], "give one output"),
    (["extract", "--table", "a.b", "--into-table", "y", "--format", "sql"], "--format applies to --to FILE only"),
    (["extract", "--table", "a.b", "--to", "OUT", "--format", "xml"], "--format must be csv or sql"),
    (["extract", "--table", "a.b.c", "--to", "OUT"], "is not SCHEMA.TABLE"),
    (["extract", "--table", "a.b", "--to", "OUT", "--target-name", "p", "--target-exclusive"],
     "--target-exclusive applies to"),
    (["find-target", "--table", "x", "--since", "not a time"], "--since"),
    (["find-target", "--table", "x", "--since", "2026-03-02 00:00+00", "--until", "2026-03-01 00:00+00"],
     "--since is after --until"),
    (["find-target"], "name the table with --table"),
    (["find-target", "--relfilenode", "16384"], "--relfilenode needs --db"),
])
def test_bad_command_lines(tmp_path: Path, pitr_exe: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out.csv"
    argv = [str(pitr_exe), "--repo", str(tmp_path / "repo"), *[str(out) if a == "OUT" else a for a in args]]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin", "PGHOST": str(tmp_path), "PGCONNECT_TIMEOUT": "2"})
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr
    assert not out.exists() and not (tmp_path / "repo").exists()
