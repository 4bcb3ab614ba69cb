"""`--log-file PATH` / `log_file`: timestamped, redacted lines appended beside stderr, whole under concurrency.

No server: synthetic segments go into a local repository bound to a fake cluster (tests/support/walgen).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from pitr.repo.format import wal_key
from tests.support.walgen import fs_repo, segment
from tests.test_layers import probe

PITR = Path(sys.executable).parent / "pitr"
LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z pitr\[(\d+)\] (\S+) (DEBUG|INFO|WARNING|ERROR): (.*)$")


def pitr(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen[str]:
    base = {"PATH": os.environ["PATH"], "HOME": "/tmp", "LANG": "C.UTF-8", "PITR_CONFIG": "/dev/null",
            "PITR_ARCHIVE_ASYNC": "false"}
    return subprocess.Popen([str(PITR), *map(str, args)], env=base | (env or {}), cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def run(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[int, str, str]:
    p = pitr(*args, env=env, cwd=cwd)
    out, err = p.communicate(timeout=120)
    return p.returncode, out, err


def parsed(log: Path) -> list[tuple[int, str, str, str]]:
    lines = log.read_text().splitlines()
    bad = [line for line in lines if not LINE.match(line)]
    assert bad == [], bad
    return [(int(m[1]), m[2], m[3], m[4]) for m in map(LINE.match, lines) if m]


def seg(tmp_path: Path, name: str) -> Path:
    d = tmp_path / "pg_wal"
    d.mkdir(exist_ok=True)
    (d / name).write_bytes(segment(name))
    return d / name


def test_wal_push_logs_timestamped_redacted_lines_and_stays_quiet_on_stderr(tmp_path: Path) -> None:
    repo = fs_repo(tmp_path / "repo")
    log = tmp_path / "pitr.log"
    seg(tmp_path, "000000010000000000000003")
    rc, out, err = run("wal-push", "pg_wal/000000010000000000000003", "--repo", repo.root, "--log-file", log,
                       cwd=tmp_path)
    assert (rc, out, err) == (0, "", "")  # stderr keeps its warning level; the file has the detail
    # a secret in what pitr reports (here a file name) never reaches the file
    rc, _, err = run("--log-file", log, "--repo", repo.root, "wal-push", "pg_wal/password=hunter2", cwd=tmp_path)
    assert rc != 0 and "hunter2" not in err
    recs = parsed(log)
    assert "hunter2" not in log.read_text() and "password=***" in log.read_text()
    assert [(c, lvl) for _, c, lvl, _ in recs] == [("wal-push", "INFO")] * 3 + [("wal-push", "INFO"),
                                                                              ("wal-push", "ERROR"),
                                                                              ("wal-push", "INFO")]
    assert recs[0][3].startswith("started: pitr wal-push pg_wal/000000010000000000000003")
    assert "000000010000000000000003 stored" in recs[1][3]
    assert re.fullmatch(r"exit 0 after \d+\.\ds", recs[2][3]) and recs[5][3].startswith(f"exit {rc} after")
    assert recs[4][3].startswith("password=*** is not a WAL file name") and "(hint: " in recs[4][3]


def test_the_fast_path_honours_the_log_file_without_loading_the_ui(tmp_path: Path) -> None:
    repo = fs_repo(tmp_path / "repo")
    log = tmp_path / "pitr.log"
    path = seg(tmp_path, "000000010000000000000004")
    env = {"PITR_REPO": str(repo.root), "PITR_ARCHIVE_ASYNC": "false"}
    assert probe(["--log-file", str(log), "wal-push", str(path)], env) == {"rc": 0, "heavy": [], "app": False}
    # and from the environment, for wal-fetch
    out = tmp_path / "out"
    assert probe(["wal-fetch", path.name, str(out)], env | {"PITR_LOG_FILE": str(log)})["rc"] == 0
    recs = parsed(log)
    assert {c for _, c, _, _ in recs} == {"wal-push", "wal-fetch"}
    assert any(m == f"fetched {path.name}" for _, c, _, m in recs if c == "wal-fetch")


def test_log_file_from_the_config_file_for_a_typer_command(tmp_path: Path) -> None:
    repo = fs_repo(tmp_path / "repo")
    log = tmp_path / "logs" / "pitr.log"
    log.parent.mkdir()
    cfg = tmp_path / "pitr.toml"
    cfg.write_text(f'repo = "{repo.root}"\nlog_file = "{log}"\n')
    rc, out, err = run("info", env={"PITR_CONFIG": str(cfg)})
    assert rc == 0, err
    recs = parsed(log)
    assert [c for _, c, _, _ in recs] == ["info", "info"] and recs[-1][3].startswith("exit 0")
    assert oct(log.stat().st_mode & 0o777) == oct(0o640 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_relative_log_file_is_refused(tmp_path: Path) -> None:
    fs_repo(tmp_path / "repo")
    rc, out, err = run("--repo", tmp_path / "repo", "info", "--log-file", "pitr.log", cwd=tmp_path)
    assert rc == 2 and out == ""
    assert err.startswith("pitr: error: log_file must be an absolute path, not 'pitr.log' (set by option --log-file)")
    assert not (tmp_path / "pitr.log").exists()


def test_a_log_file_that_cannot_be_written_does_not_stop_archiving(tmp_path: Path) -> None:
    repo = fs_repo(tmp_path / "repo")
    seg(tmp_path, "000000010000000000000005")
    rc, _, err = run("--log-file", tmp_path / "no-such-dir" / "pitr.log", "--repo", repo.root,
                     "wal-push", "pg_wal/000000010000000000000005", cwd=tmp_path)
    assert rc == 0
    assert err.startswith("pitr: warning: cannot open the log file ") and "logging to stderr only" in err
    assert repo.stat(wal_key("000000010000000000000005")) is not None


WRITER = """
import logging, sys
from pitr.cli.common import open_log_file, setup_logging
setup_logging(0, False)
open_log_file(sys.argv[1], "writer", [])
log = logging.getLogger("pitr")
for i in range(int(sys.argv[3])):
    log.info("%s %d %s", sys.argv[2], i, sys.argv[2] * 9000)
"""


def test_two_processes_append_whole_lines(tmp_path: Path) -> None:
    """Records far longer than a pipe or stdio buffer, from two processes at once: no line torn or lost."""
    log = tmp_path / "pitr.log"
    n = 400
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(log), tag, str(n)], stderr=subprocess.PIPE,
                              text=True) for tag in ("A", "B")]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read() if p.stderr else ""
    recs = parsed(log)
    for tag in ("A", "B"):
        mine = [m for _, _, _, m in recs if m.startswith(f"{tag} ")]
        assert [int(m.split()[1]) for m in mine] == list(range(n))
        assert all(m.split()[2] == tag * 9000 for m in mine)


def test_concurrent_wal_pushes_share_one_log(tmp_path: Path) -> None:
    repo = fs_repo(tmp_path / "repo")
    log = tmp_path / "pitr.log"
    names = [f"0000000100000000000000{i:02X}" for i in range(16, 24)]
    for name in names:
        seg(tmp_path, name)
    procs = [pitr("-vv", "--log-file", log, "--repo", repo.root, "wal-push", f"pg_wal/{name}", cwd=tmp_path)
             for name in names]
    for p in procs:
        p.communicate(timeout=120)
        assert p.returncode == 0
    recs = parsed(log)
    pids = {pid for pid, _, _, _ in recs}
    assert len(pids) == len(names)
    for pid in pids:
        mine = [m for p, _, _, m in recs if p == pid]
        assert mine[0].startswith("started: ") and mine[-1].startswith("exit 0 ")
    assert sorted(m.split()[0] for _, _, _, m in recs if " stored (" in m) == names
