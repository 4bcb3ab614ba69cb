"""README's first command, scripts/demo.sh, runs the invoice story through scripts/demo_story.py.

Run here without demo.sh's install step (the test venv is the one setup.sh made): the story must
end in "recovered 200" with an RPO and an RTO, leave no server and no directory behind, and —
so that its checks are known to bite — fail when it restores to a moment after the deletion.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.pg import pg_bin_dirs

ROOT = Path(__file__).resolve().parent.parent
STORY = ROOT / "scripts" / "demo_story.py"

pytestmark = [pytest.mark.slow, pytest.mark.pg,
              pytest.mark.skipif(not pg_bin_dirs(), reason="no PostgreSQL server binaries")]


def run_story(*args: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    proc = subprocess.run([sys.executable, str(STORY), "--gap", "0.5", *args], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    m = re.search(r"cluster in (/tmp/pitr-demo-\S+)", proc.stderr)
    assert m, proc.stderr
    return proc, Path(m[1])


def assert_cleaned_up(base: Path) -> None:
    assert not base.exists(), f"the demo left {base} behind"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert str(base) not in ps, "a server the demo started is still running"


def test_demo_tells_the_story_in_checked_figures() -> None:
    proc, base = run_story()
    assert proc.returncode == 0, proc.stderr[-4000:]
    whole = next(line for line in proc.stdout.splitlines() if line.startswith("invoices 2,000"))
    m = re.fullmatch(r"invoices 2,000 · lost 200 · recovered 200 · RPO (\d+\.\d) s · RTO (\d+\.\d) s", whole)
    assert m, proc.stdout
    # the surgical story: find-target + extract, later writes kept
    assert proc.stdout.strip().splitlines()[-1] == "invoices 2,050 · lost 200 · recovered 200 · later writes kept 50"
    assert 0 <= float(m[1]) < 60 and 0 < float(m[2]) < 120
    assert "[FAIL]" not in proc.stderr
    assert "the restored invoices table is identical to the state at T (md5)" in proc.stderr
    assert_cleaned_up(base)


def test_demo_fails_when_a_figure_is_wrong() -> None:
    proc, base = run_story("--fault", "late-target")
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "[FAIL] the restored copy holds 1,800 invoices" in proc.stderr
    assert "[FAIL] 0 of the 200 deleted invoices are back" in proc.stderr
    assert "recovered 0" in proc.stdout and "recovered 200" not in proc.stdout  # neither story passes
    assert "[FAIL] 0 of the 200 deleted invoices re-inserted from the extract" in proc.stderr
    assert_cleaned_up(base)
