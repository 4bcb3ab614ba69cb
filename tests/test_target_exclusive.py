"""`restore --target-exclusive`: recovery_target_inclusive = off for time, LSN and xid targets only."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pitr.errors import UsageError
from pitr.ops.recovery.restore_plan import make_exclusive, parse_target


@pytest.mark.parametrize("kw", [{"xid": "745"}, {"lsn": "0/3000148"}, {"time": "2026-03-01 12:00:00+00"}])
def test_exclusive_turns_inclusive_off(kw: dict[str, str]) -> None:
    t = parse_target(**kw)
    assert "recovery_target_inclusive" not in t.settings()
    s = make_exclusive(t).settings()
    assert s["recovery_target_inclusive"] == "off"
    assert set(s) - {"recovery_target_inclusive"} == set(t.recovery_settings())
    assert make_exclusive(t).to_json()["exclusive"] is True
    assert "just before" in make_exclusive(t).describe()


@pytest.mark.parametrize("kw", [{"name": "before-sync"}, {"target": "immediate"}, {}])
def test_exclusive_refused_without_a_point_to_stop_before(kw: dict[str, str]) -> None:
    with pytest.raises(UsageError, match="--target-exclusive applies to"):
        make_exclusive(parse_target(**kw))


def test_cli_refuses_exclusive_with_a_name_target(tmp_path: Path, pitr_exe: Path) -> None:
    dest = tmp_path / "d"
    p = subprocess.run([str(pitr_exe), "--repo", f"file://{tmp_path / 'repo'}", "restore", "--pgdata", str(dest),
                        "--target-name", "x", "--target-exclusive"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert "--target-exclusive applies to" in p.stderr and "Traceback" not in p.stderr
    assert not dest.exists()
