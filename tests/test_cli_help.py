"""The CLI's public face: shell completion, help examples and metavars, `pitr help`, --json `version`.

Runs the installed console script as a user would; no server is needed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PITR = Path(sys.executable).parent / "pitr"


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
