"""archive_command as a shell one-liner (`pitr archive-command`, pg/archive_command.py).

What a user checks: every segment PostgreSQL archives through the line is in the repository byte
for byte, while a Python process runs only to start the async archiver (not once per segment);
the line exits 0 only for a file the helper stored, under its settings, with the very identity
the file has now; anything else goes to `pitr wal-push`, whose answer (and exit code) stands.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pitr.cli import globalargs
from pitr.ops.wal import archive, pushd, spool
from pitr.pg import walname
from pitr.pg.archive_command import render_archive_command
from pitr.repo.meta import read_meta
from pitr.storage.fs import FsStorage
from tests.support import walgen
from tests.support.pg import chown_pg, make_tmpdir, rmtree_pg, run_as_postgres

PITR = str(Path(sys.executable).parent / "pitr")


def substitute(line: str, path: str) -> str:
    """What PostgreSQL does to archive_command before /bin/sh runs it (16+ refuses other placeholders)."""
    out, i = [], 0
    while i < len(line):
        ch = line[i]
        if ch != "%":
            out.append(ch)
            i += 1
            continue
        nxt = line[i + 1: i + 2]
        assert nxt in ("p", "f", "%"), f"placeholder %{nxt} PostgreSQL would refuse at {line[i - 20:i + 5]!r}"
        out.append({"p": path, "f": os.path.basename(path), "%": "%"}[nxt])
        i += 2
    return "".join(out)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PITR_", "AWS_ENDPOINT"))}
    return env | extra


def _counting_pitr(base: Path) -> tuple[Path, Path]:
    """A `pitr` that records each start (a Python process) before running the real one."""
    count = base / "starts"
    count.touch()
    exe = base / "counted-pitr"
    exe.write_text(f"#!/bin/sh\necho \"$*\" >> {count}\nexec {PITR} \"$@\"\n")
    exe.chmod(0o755)
    chown_pg(exe)
    chown_pg(count)
    return exe, count


def _starts(count: Path) -> int:
    return len(count.read_text().splitlines())


@pytest.fixture
def site() -> Iterator[tuple[Path, Path]]:
    """(pgdata with pg_wal/archive_status and a postmaster.pid, initialised fs repo); no server."""
    base = make_tmpdir("pitr-arcmd-")
    pgdata = base / "data"
    (pgdata / "pg_wal" / "archive_status").mkdir(parents=True)
    (pgdata / "postmaster.pid").write_text(f"{os.getpid()}\n{pgdata}\n1700000000\n5432\n")
    walgen.fs_repo(base / "repo")
    yield pgdata, base / "repo"
    walgen.stop_helper(pgdata / "pg_wal" / spool.ARCHIVE_SPOOL)
    rmtree_pg(base)


_queue = walgen.queue_ready


def _run(line: str, pgdata: Path, name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """archive_command as PostgreSQL runs it: substituted, /bin/sh -c, in the data directory."""
    return subprocess.run(["/bin/sh", "-c", substitute(line, f"pg_wal/{name}")], cwd=pgdata, env=env,
                          capture_output=True, text=True, timeout=120)


def _wait_ok(sdir: Path, names: list[str]) -> None:
    deadline = time.monotonic() + 30
    while not all((sdir / f"{n}.ok").exists() for n in names):
        assert time.monotonic() < deadline, "look-ahead files were not pushed"
        time.sleep(0.05)


def test_the_line_acknowledges_from_the_shell_only_what_the_helper_stored(site: tuple[Path, Path]) -> None:
    pgdata, repo = site
    exe, count = _counting_pitr(pgdata.parent)
    env = _env(PITR_REPO=str(repo), PITR_ARCHIVE_PUSH_JOBS="2")
    line = render_archive_command([str(exe)], [], globalargs.archive_token([]))
    sdir = pgdata / "pg_wal" / spool.ARCHIVE_SPOOL
    names = walgen.names(3, 5)
    _queue(pgdata, names)

    # no helper yet: the fallback (one Python start) starts it and waits for the first file
    r = _run(line, pgdata, names[0], env)
    assert r.returncode == 0, r.stderr
    assert _starts(count) == 1
    _wait_ok(sdir, names)
    # the rest the helper stored ahead: acknowledged by the shell alone, no Python start
    for n in names[1:4]:
        r = _run(line, pgdata, n, env)
        assert r.returncode == 0, r.stderr
    assert _starts(count) == 1
    ok = spool.read_marker(sdir / f"{names[1]}.ok")
    st = os.stat(pgdata / "pg_wal" / names[1])
    assert ok and ok["sh"] == f"{globalargs.archive_token([])}:{spool.shell_identity(st)}"
    store = walgen.FsStorage(repo)
    meta = read_meta(store)
    for n in names[:4]:
        out = pgdata.parent / f"back-{n}"
        archive.fetch(store, meta, n, out)
        assert out.read_bytes() == (pgdata / "pg_wal" / n).read_bytes()
    assert "acknowledges from the shell" in (sdir / "pushd.log").read_text()

    # the same name with other bytes (identity changed): the shell does not vouch, wal-push refuses
    (pgdata / "pg_wal" / names[4]).write_bytes(walgen.segment(names[4], seed=7))
    r = _run(line, pgdata, names[4], env)
    assert r.returncode == 1
    assert f"already holds a different {names[4]}" in r.stderr
    assert _starts(count) == 2

    # a line whose token does not digest its options (edited by hand): every file goes through wal-push,
    # which replaces the helper (other environment), and the new helper never writes the shell's line
    forged = render_archive_command([str(exe)], [], "0" * 16)
    (pgdata / "pg_wal" / "archive_status" / f"{names[2]}.ready").touch()
    r = _run(forged, pgdata, names[2], env)
    assert r.returncode == 0, r.stderr
    assert _starts(count) == 3
    ok = spool.read_marker(sdir / f"{names[2]}.ok")
    assert ok is not None and "sh" not in ok
    assert "does not match the options archive_command passes pitr" in (sdir / "pushd.log").read_text()


def test_the_line_hands_errors_and_exited_helpers_to_wal_push(site: tuple[Path, Path]) -> None:
    """The helper's recorded error, or a helper gone (pushd.exited): wal-push answers, with its exit code."""
    pgdata, repo = site
    exe, count = _counting_pitr(pgdata.parent)
    sdir = pgdata / "pg_wal" / spool.ARCHIVE_SPOOL
    token = globalargs.archive_token([])
    line = render_archive_command([str(exe)], [], token)
    a, b = walgen.names(11, 2)
    _queue(pgdata, [a, b])
    env = _env(PITR_REPO=str(repo))
    fd = spool.take_lock(sdir, spool.PUSHD)  # this test plays the running helper
    assert fd is not None
    try:
        spool.publish_fingerprint(fd, globalargs.fingerprint([], env | {"PITR_ARCHIVE_TOKEN": token}))
        spool.write_error(sdir, a, f"cannot write {a}: disk full", "free space in the repository")
        r = _run(line, pgdata, a, env)
        assert r.returncode == 1
        assert f"cannot write {a}: disk full" in r.stderr
        assert _starts(count) == 1
    finally:
        os.close(fd)
    # a marker of this very file with the shell's line, from a helper that has exited: not trusted
    (sdir / spool.PUSHD_EXITED).touch()
    st = os.stat(pgdata / "pg_wal" / b)
    spool.write_ok(sdir, b, "f" * 32, spool.file_identity(st), "stored", f"{token}:{spool.shell_identity(st)}")
    r = _run(line, pgdata, b, _env(PITR_REPO=str(pgdata.parent / "nowhere"), PITR_ARCHIVE_ASYNC="false"))
    assert r.returncode != 0, r.stderr
    assert _starts(count) == 2


def test_shell_acknowledgement_needs_the_same_settings_and_server(site: tuple[Path, Path]) -> None:
    pgdata, _ = site
    fp = "a" * 32
    current = [fp]
    check = pushd.shell_ok_check(pgdata, fp, lambda: current[0])
    assert check is not None and check()
    current[0] = "b" * 32  # the config file was edited
    assert not check()
    current[0] = fp
    (pgdata / "postmaster.pid").write_text(f"{os.getpid() + 1}\n{pgdata}\n1700000999\n5432\n")  # restarted
    assert not check()
    (pgdata / "postmaster.pid").unlink()
    assert pushd.shell_ok_check(pgdata, fp, lambda: fp) is None  # no server: never


def test_a_restarted_server_retires_the_archiver(site: tuple[Path, Path]) -> None:
    """Its environment may differ: the helper leaves, and the next call starts one with the new one."""
    pgdata, _ = site
    cfg = pushd.PushdConfig(pgdata / "pg_wal", pgdata / "pg_wal" / spool.ARCHIVE_SPOOL, "a" * 32, 1, None)  # type: ignore[arg-type]
    check = pushd.keep_going_checks(cfg, pgdata, lambda: "a" * 32)
    assert check() is None
    (pgdata / "postmaster.pid").write_text(f"{os.getpid() + 1}\n{pgdata}\n1700000999\n5432\n")
    assert check() == "the server restarted"
    (pgdata / "postmaster.pid").unlink()
    assert check() == "the server is not running"


def test_rendered_line_survives_postgres_substitution_and_quoting() -> None:
    spool_dir = "/srv/pitr spool/archive"
    line = render_archive_command(["/opt/pitr/bin/pitr"], ["--config", "/etc/pitr/a b.toml"], "0123456789abcdef",
                                  spool_dir)
    text = substitute(line, "pg_wal/000000010000000000000003")
    assert "stat -c %d:%i:%s:%.9Y pg_wal/000000010000000000000003" in text
    assert "d='/srv/pitr spool/archive'" in text
    assert text.endswith("PITR_ARCHIVE_TOKEN=0123456789abcdef /opt/pitr/bin/pitr --config '/etc/pitr/a b.toml' "
                         "wal-push pg_wal/000000010000000000000003")
    assert subprocess.run(["/bin/sh", "-n", "-c", text]).returncode == 0


def test_archive_command_prints_a_line_pitr_check_accepts(cluster_factory, tmp_pg_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """A real server archiving through the printed line: every segment stored, Python started rarely."""
    root = tmp_pg_dir / "repo"
    env = {"PITR_ARCHIVE_PUSH_JOBS": "2"}
    p = run_as_postgres([PITR, "--repo", f"file://{root}", "-v", "archive-command"], env=env, cwd="/tmp")
    m = re.fullmatch(r"archive_command = '(.*)'\n", p.stdout)
    assert m, p.stdout
    line = m.group(1).replace("''", "'")
    assert "-v" not in line.split() and f"--repo file://{root}" in line
    exe, count = _counting_pitr(tmp_pg_dir)
    conf_line = line.replace(PITR, str(exe)).replace("'", "''")
    c = cluster_factory("pg")
    c.initdb(f"archive_mode = on\narchive_command = '{conf_line}'\n").start(env=env)
    r = run_as_postgres([PITR, "--repo", f"file://{root}", "init"], env=env | c.env(), cwd="/tmp", check=False)
    assert r.returncode == 0, r.stderr
    c.sql("create table t (id int, v text)")
    first = c.switch_wal()
    c.wait_archived(first)
    segs = []
    for i in range(8):
        c.sql(f"insert into t select g, md5(g::text) from generate_series({i * 500}, {i * 500 + 499}) g")
        segs.append(c.switch_wal())
    c.wait_archived(segs[-1], timeout=120)
    assert c.scalar("select failed_count from pg_stat_archiver") == 0
    store = FsStorage(root)
    meta = read_meta(store)
    stored = {o.key.rsplit("/", 1)[-1] for o in store.list("wal/")}
    for n in segs:
        assert n in stored, f"{n} not archived"
        out = tmp_pg_dir / "fetched"
        archive.fetch(store, meta, n, out)
        assert out.read_bytes() == (c.data / "pg_wal" / n).read_bytes(), n
    # Python started to launch the helper (and perhaps once more on a slow machine), not per segment
    assert _starts(count) <= 3, count.read_text()
    assert walname.segno(segs[-1]) - walname.segno(first) >= 8
    r = run_as_postgres([PITR, "--repo", f"file://{root}", "check"], env=env | c.env(), cwd="/tmp", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    c.stop()
    walgen.stop_helper(c.data / "pg_wal" / spool.ARCHIVE_SPOOL)
