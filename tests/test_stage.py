"""The replay stage (ops/wal/stage.py) without a server: restore_command as a shell one-liner.

What a user checks: the one-liner hands over verified segments from the stage, the helper keeps
the stage filled as files are taken (nobody tells it), the helper's log counts what came from the
stage and what went through wal-fetch, a file in an earlier restore's stage or left before the
helper started is never handed over, a stage others can write into is refused, and the exit codes
are wal-fetch's (1 only for a name the repository lacks, above 125 when it cannot be read).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pitr.ops.wal import spool, stage
from pitr.pg.recovery import render_restore_command
from tests.support import walgen
from tests.support.pg import make_tmpdir, rmtree_pg

PITR = str(Path(sys.executable).parent / "pitr")
OTHER_SYSID = 7300000000000000099


@pytest.fixture
def fake() -> Iterator[tuple[Path, Path, list[str]]]:
    """(pgdata being recovered, repo, archived segment names) for a fake cluster."""
    base = make_tmpdir("pitr-stage-")
    names = walgen.names(5, 8)
    pgdata = walgen.archived_cluster(base, names)
    yield pgdata, base / "repo", names
    for d in stage.helper_dirs(pgdata):
        stage.stop(d)
    rmtree_pg(base)


def _env(repo: Path) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PITR_")} | {"PITR_REPO": str(repo)}


def _command(token: str, prefetch: int = 3) -> str:
    return render_restore_command([PITR], prefetch=prefetch, stage=token)


def _restore_command(pgdata: Path, cmd: str, name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run restore_command as PostgreSQL does: %f/%p substituted, /bin/sh -c, in the data directory."""
    (pgdata / "pg_wal" / "RECOVERYXLOG").unlink(missing_ok=True)
    value = cmd.replace("%f", name).replace("%p", "pg_wal/RECOVERYXLOG").replace("%%", "%")
    return subprocess.run(["/bin/sh", "-c", value], cwd=pgdata, env=env, capture_output=True, text=True,
                          timeout=120)


def _wait(pred, what: str, limit: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _start(pgdata: Path, repo: Path, token: str, first: str | None, prefetch: int = 3) -> Path:
    d = stage.stage_dir(pgdata / "pg_wal", token)
    stage.start_helper([PITR], _env(repo) | {"PITR_PREFETCH": str(prefetch), "PITR_STAGE": token}, d, pgdata,
                       None, first)
    assert stage.wait_started(d), (d / "prefetch.log").read_text()
    return d


def _counts(d: Path) -> tuple[int, int, int]:
    """(segments taken from the stage, requests through wal-fetch, requests the one-liner made itself)
    from the helper's log once it exited."""
    stage.stop(d)
    log = (d / "prefetch.log").read_text()
    m = re.findall(r"(\d+) prefetched segments taken, (\d+) requests through wal-fetch, (\d+) answered in the shell",
                   log)
    assert m, log
    return int(m[-1][0]), int(m[-1][1]), int(m[-1][2])


def test_one_liner_takes_staged_segments_and_the_window_follows(fake: tuple[Path, Path, list[str]]) -> None:
    pgdata, repo, names = fake
    src = repo.parent / "src"
    token = stage.new_token()
    stage.prepare(pgdata, token, None)
    d = _start(pgdata, repo, token, names[0])
    cmd = _command(token)
    assert cmd.startswith(f"mv -f pg_wal/pitr_stage/{token}/%f %p 2>/dev/null || {{ n=0; while [ -e ")
    assert f" *) PITR_PREFETCH=3 PITR_STAGE={token} {PITR} wal-fetch %f %p ;; esac; }}; }}" in cmd
    for n in names:
        # nobody tells the helper what PostgreSQL took: the files vanishing from the stage move its window
        _wait(lambda n=n: (d / n).exists(), f"{n} was not staged")
        r = _restore_command(pgdata, cmd, n, _env(repo))
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert (pgdata / "pg_wal" / "RECOVERYXLOG").read_bytes() == (src / n).read_bytes()
        assert not (d / n).exists()
    assert (stat_mode := os.stat(d).st_mode & 0o777) == 0o700, oct(stat_mode)
    # past the end of the archive, and a history probe: the one-liner asks the helper itself (no Python
    # start), which proves the names absent after the request: 1 and nothing created
    for absent in (walgen.names(13, 1)[0], "00000002.history"):
        r = _restore_command(pgdata, cmd, absent, _env(repo))
        assert r.returncode == 1, r.stderr
        assert not (pgdata / "pg_wal" / "RECOVERYXLOG").exists()
    assert _counts(d) == (len(names), 0, 2)
    assert not [e for e in os.listdir(d) if len(e) >= 24 and not e.startswith("prefetch")]  # emptied on exit


def test_without_a_helper_the_fallback_starts_one(fake: tuple[Path, Path, list[str]]) -> None:
    """A hand-written standby: nothing started the helper; the first wal-fetch does, and then the stage serves."""
    pgdata, repo, names = fake
    src = repo.parent / "src"
    token = stage.new_token()
    cmd = _command(token)
    d = stage.stage_dir(pgdata / "pg_wal", token)
    r = _restore_command(pgdata, cmd, names[0], _env(repo))
    assert r.returncode == 0, r.stderr
    assert (pgdata / "pg_wal" / "RECOVERYXLOG").read_bytes() == (src / names[0]).read_bytes()
    assert os.stat(d).st_mode & 0o777 == 0o700 and os.stat(d.parent).st_mode & 0o777 == 0o700
    for n in names[1:]:
        _wait(lambda n=n: (d / n).exists(), f"{n} was not staged")
        r = _restore_command(pgdata, cmd, n, _env(repo))
        assert r.returncode == 0, r.stderr
        assert (pgdata / "pg_wal" / "RECOVERYXLOG").read_bytes() == (src / n).read_bytes()
    assert _counts(d) == (len(names) - 1, 1, 0)


def test_a_foreign_file_in_an_earlier_or_unstarted_stage_is_never_served(fake: tuple[Path, Path, list[str]]) -> None:
    """Threat: a file under the right name with other content (another cluster's segment) left in a stage
    by an earlier restore, or in this stage before its helper ran (a helper killed while serving another
    repository). A new restore removes earlier stages and names a new one; a helper empties its stage
    when it starts."""
    pgdata, repo, names = fake
    src = repo.parent / "src"
    old = stage.new_token()
    stage.prepare(pgdata, old, None)
    planted = walgen.segment(names[0], sysid=OTHER_SYSID)
    (stage.stage_dir(pgdata / "pg_wal", old) / names[0]).write_bytes(planted)

    token = stage.new_token()
    stage.prepare(pgdata, token, None)  # what `restore` does (also with --delta)
    assert not stage.stage_dir(pgdata / "pg_wal", old).exists()
    d = stage.stage_dir(pgdata / "pg_wal", token)
    (d / names[1]).write_bytes(walgen.segment(names[1], sysid=OTHER_SYSID))  # left before the helper started
    _start(pgdata, repo, token, names[0])
    cmd = _command(token)
    for n in names[:3]:
        _wait(lambda n=n: (d / n).exists() and (d / f"{n}.meta").exists(), f"{n} was not staged")
        r = _restore_command(pgdata, cmd, n, _env(repo))
        assert r.returncode == 0, r.stderr
        assert (pgdata / "pg_wal" / "RECOVERYXLOG").read_bytes() == (src / n).read_bytes()


def test_a_stage_others_can_write_into_is_refused(fake: tuple[Path, Path, list[str]]) -> None:
    """Another OS user could plant files in a stage it can write into: the helper stages nothing there
    (it says why in its log) and every file comes through wal-fetch, verified."""
    pgdata, repo, names = fake
    src = repo.parent / "src"
    token = stage.new_token()
    d = stage.prepare(pgdata, token, None)
    assert d is not None
    os.chown(d, 65534, 65534)  # nobody's, open to all: not the server's user's
    os.chmod(d, 0o777)
    cmd = _command(token)
    for n in names[:3]:
        r = _restore_command(pgdata, cmd, n, _env(repo))
        assert r.returncode == 0, r.stderr
        assert (pgdata / "pg_wal" / "RECOVERYXLOG").read_bytes() == (src / n).read_bytes()
    log = (d / "prefetch.log").read_text()
    assert "not staging" in log and "not by the server's user" in log, log
    assert not [e for e in os.listdir(d) if len(e) == 24]
    assert spool.helper_state(d, spool.PREFETCHD) is None


def test_exit_codes_are_wal_fetchs(fake: tuple[Path, Path, list[str]]) -> None:
    """1 only when the repository proves the name absent; above 125 when the repository is gone,
    even while the stage still holds other segments."""
    pgdata, repo, names = fake
    token = stage.new_token()
    stage.prepare(pgdata, token, None)
    d = _start(pgdata, repo, token, names[0])
    cmd = _command(token)
    _wait(lambda: (d / names[2]).exists(), "not staged")
    beyond = walgen.names(13, 1)[0]
    assert _restore_command(pgdata, cmd, beyond, _env(repo)).returncode == 1
    assert _restore_command(pgdata, cmd, "00000009.history", _env(repo)).returncode == 1
    shutil.move(repo, repo.with_name("repo.gone"))
    # the helper still runs but cannot prove the name absent: it answers "failed", the one-liner goes to
    # wal-fetch, which cannot read the repository either
    r = _restore_command(pgdata, cmd, beyond, _env(repo) | {"PITR_FETCH_RETRIES": "0"})
    assert r.returncode > 125, r.stderr
    stage.stop(d)
    r = _restore_command(pgdata, cmd, beyond, _env(repo) | {"PITR_FETCH_RETRIES": "0"})
    assert r.returncode > 125, r.stderr
    assert not (pgdata / "pg_wal" / "RECOVERYXLOG").exists()
    bad = _restore_command(pgdata, cmd.replace(f"PITR_STAGE={token}", "PITR_STAGE=../x"), beyond, _env(repo))
    assert bad.returncode > 125 and "PITR_STAGE" in bad.stderr, bad.stderr


def test_restore_command_prints_the_one_liner_with_a_new_stage(fake: tuple[Path, Path, list[str]]) -> None:
    """`pitr restore-command`: the line for a hand-written standby, a new stage each time, and it works."""
    pgdata, repo, names = fake
    src = repo.parent / "src"

    def line(*args: str) -> str:
        p = subprocess.run([PITR, "--repo", str(repo), "restore-command", *args], capture_output=True, text=True,
                           env=_env(repo), check=True)
        m = re.fullmatch(r"restore_command = '(.*)'\n", p.stdout)
        assert m, p.stdout
        return m.group(1).replace("''", "'")

    one, two = line(), line()
    t1 = re.search(r"PITR_STAGE=([0-9a-f]{16}) ", one)
    t2 = re.search(r"PITR_STAGE=([0-9a-f]{16}) ", two)
    assert t1 and t2 and t1.group(1) != t2.group(1)
    assert one.startswith(f"mv -f pg_wal/pitr_stage/{t1.group(1)}/%f %p 2>/dev/null || {{ n=0; while [ -e ")
    assert f" *) PITR_PREFETCH=8 PITR_STAGE={t1.group(1)} {PITR} --repo {repo} wal-fetch %f %p ;; esac; }}; }}" in one
    assert line("--prefetch", "0") == f"PITR_PREFETCH=0 {PITR} --repo {repo} wal-fetch %f %p"
    r = _restore_command(pgdata, one, names[0], _env(repo))
    assert r.returncode == 0, r.stderr
    assert (pgdata / "pg_wal" / "RECOVERYXLOG").read_bytes() == (src / names[0]).read_bytes()


# --- the one-liner's wait for a segment the helper is still writing (no helper: the test plays it) ---

# PostgreSQL runs restore_command with /bin/sh: dash on Debian/Ubuntu, bash on RHEL
SHELLS: dict[str, str] = {}
for _sh in ("/bin/sh", shutil.which("dash"), shutil.which("bash")):
    if _sh:
        SHELLS.setdefault(os.path.realpath(_sh), _sh)


@pytest.fixture
def staging(tmp_path: Path) -> tuple[Path, Path, str, Path]:
    """(data directory, its stage, the one-liner, the fallback's marker): the fallback is a fake pitr
    that records its arguments and exits 7, so a test sees whether and when wal-fetch would have run."""
    pgdata = tmp_path / "pgdata"
    token = stage.new_token()
    d = stage.stage_dir(pgdata / "pg_wal", token)
    d.mkdir(parents=True)
    marker = tmp_path / "fallback-ran"
    exe = tmp_path / "fake pitr"
    exe.write_text(f'#!/bin/sh\nprintf "%s\\n" "$PITR_STAGE" "$@" > {shlex.quote(str(marker))}\nexit 7\n')
    exe.chmod(0o755)
    return pgdata, d, render_restore_command([str(exe)], prefetch=3, stage=token), marker


def _run_timed(shell: str, pgdata: Path, cmd: str, name: str) -> tuple[int, float]:
    value = cmd.replace("%f", name).replace("%p", "pg_wal/RECOVERYXLOG").replace("%%", "%")
    t0 = time.monotonic()
    # embedded in a script that goes on after it, as a wrapper would: no outcome may leave the script
    script = f'{value}\nrc=$?; echo "after $rc"; exit $rc'
    r = subprocess.run([shell, "-c", script], cwd=pgdata, capture_output=True, text=True, timeout=60)
    assert r.stdout.splitlines()[-1:] == [f"after {r.returncode}"], (r.stdout, r.stderr)
    return r.returncode, time.monotonic() - t0


def _later(delay: float, action) -> threading.Thread:  # type: ignore[no-untyped-def]
    t = threading.Timer(delay, action)
    t.start()
    return t


@pytest.mark.parametrize("shell", list(SHELLS.values()))
def test_one_liner_waits_for_a_segment_being_staged(shell: str, staging: tuple[Path, Path, str, Path]) -> None:
    """The helper is still writing the segment PostgreSQL asks for: the one-liner waits for its rename
    instead of starting wal-fetch (a Python start that would wait for the helper anyway)."""
    pgdata, d, cmd, marker = staging
    name = walgen.names(3, 1)[0]
    data = walgen.segment(name)
    (d / spool.partial_name(name)).write_bytes(data)
    t = _later(0.3, lambda: os.replace(d / spool.partial_name(name), d / name))
    rc, took = _run_timed(shell, pgdata, cmd, name)
    t.join()
    assert rc == 0 and not marker.exists(), marker.read_text() if marker.exists() else rc
    assert (pgdata / "pg_wal" / "RECOVERYXLOG").read_bytes() == data
    assert not (d / name).exists() and took >= 0.25


@pytest.mark.parametrize("shell", list(SHELLS.values()))
def test_one_liner_falls_back_when_the_part_is_left_forever(shell: str,
                                                            staging: tuple[Path, Path, str, Path]) -> None:
    """A helper killed mid-fetch leaves its .part: the wait is bounded, then wal-fetch (which restarts the
    helper) answers, with its exit code and the stage token."""
    pgdata, d, cmd, marker = staging
    name = walgen.names(3, 1)[0]
    (d / spool.partial_name(name)).write_bytes(b"half a segment")
    rc, took = _run_timed(shell, pgdata, cmd, name)
    assert rc == 7 and marker.read_text().split("\n")[:3] == [d.name, "wal-fetch", name]
    assert 2.5 <= took < 20, took  # ~3 s of polling (more on a loaded host), then the fallback
    assert not (pgdata / "pg_wal" / "RECOVERYXLOG").exists()


@pytest.mark.parametrize("shell", list(SHELLS.values()))
def test_one_liner_falls_back_at_once_when_the_part_vanishes(shell: str,
                                                            staging: tuple[Path, Path, str, Path]) -> None:
    """The helper's fetch failed (it deletes its .part, no file): wal-fetch answers as soon as that is seen."""
    pgdata, d, cmd, marker = staging
    name = walgen.names(3, 1)[0]
    (d / spool.partial_name(name)).write_bytes(b"half a segment")
    t = _later(0.3, lambda: (d / spool.partial_name(name)).unlink())
    rc, took = _run_timed(shell, pgdata, cmd, name)
    t.join()
    assert rc == 7 and marker.exists()
    assert 0.25 <= took < 2.0, took  # waited while the .part was there, not for the whole bound


@pytest.mark.parametrize("shell", list(SHELLS.values()))
def test_one_liner_falls_back_at_once_when_nothing_is_staged(shell: str,
                                                            staging: tuple[Path, Path, str, Path]) -> None:
    pgdata, d, cmd, marker = staging
    name = walgen.names(3, 1)[0]
    (d / walgen.names(4, 1)[0]).write_bytes(b"another segment")
    (d / spool.partial_name(walgen.names(5, 1)[0])).write_bytes(b"another one being staged")
    rc, took = _run_timed(shell, pgdata, cmd, name)
    assert rc == 7 and marker.read_text().split("\n")[:3] == [d.name, "wal-fetch", name]
    assert took < 1.5, took
    assert not (pgdata / "pg_wal" / "RECOVERYXLOG").exists()


def test_a_stage_takes_no_crc_and_wal_fetch_still_checks_size_and_header(fake: tuple[Path, Path, list[str]]) -> None:
    """In a stage the helper takes no CRC-32 (the shell rename re-checks nothing, so it would guard only
    wal-fetch's few takes); wal-fetch's take from a stage still refuses a file of another size or with
    another cluster's page header. The prefetch spool (not a stage) keeps its CRC."""
    import zlib

    from pitr.ops.wal import prefetch
    from pitr.repo.meta import read_meta
    from pitr.storage.fs import FsStorage

    pgdata, repo, names = fake
    src = repo.parent / "src"
    storage = FsStorage(repo)
    meta = read_meta(storage)
    d = stage.prepare(pgdata, stage.new_token(), None)
    assert d is not None
    cfg = prefetch.PrefetchConfig(d, "fp", 3, 1, stage=True)
    for n in names[:3]:
        prefetch.fetch_one(storage, meta, cfg, n)
        assert spool.read_marker(d / f"{n}.meta")["crc32"] == str(spool.NO_CRC)  # type: ignore[index]
    dest = pgdata / "pg_wal" / "RECOVERYXLOG"
    assert spool.take_prefetched(d, names[0], dest, "fp") is None
    assert dest.read_bytes() == (src / names[0]).read_bytes()
    os.truncate(d / names[1], 8192)
    assert "is 8192 bytes" in (spool.take_prefetched(d, names[1], dest, "fp") or "")
    (d / names[2]).write_bytes(walgen.segment(names[2], sysid=OTHER_SYSID))
    assert "prefetched copy" in (spool.take_prefetched(d, names[2], dest, "fp") or "")
    assert dest.read_bytes() == (src / names[0]).read_bytes() and not (d / names[2]).exists()

    sp = pgdata / "pg_wal" / spool.PREFETCH_SPOOL
    sp.mkdir()
    prefetch.fetch_one(storage, meta, prefetch.PrefetchConfig(sp, "fp", 3, 1), names[3])
    crc = spool.read_marker(sp / f"{names[3]}.meta")["crc32"]  # type: ignore[index]
    assert crc == str(zlib.crc32((src / names[3]).read_bytes()))


def test_the_helper_waits_while_its_starter_runs_then_goes_idle(fake: tuple[Path, Path, list[str]]) -> None:
    """restore --replay starts the helper while it still writes the files (minutes at scale): it must not
    exit idle and empty the stage meanwhile; once the request is not its starter's it idles out as usual."""
    pgdata, repo, names = fake
    token = stage.new_token()
    d = stage.prepare(pgdata, token, None)
    assert d is not None
    proc = stage.start_helper([PITR], _env(repo) | {"PITR_PREFETCH": "3", "PITR_STAGE": token,
                                                    "_PITR_PREFETCH_IDLE_EXIT": "0.5"}, d, pgdata, None, names[0])
    assert stage.wait_started(d, proc=proc), (d / "prefetch.log").read_text()
    _wait(lambda: all((d / n).exists() for n in names[:4]), "the first segments were not staged")
    time.sleep(2.5)  # five idle periods: this process (its starter) still runs
    assert spool.helper_state(d, spool.PREFETCHD) is not None and proc.poll() is None
    assert all((d / n).exists() for n in names[:4])
    # a request PostgreSQL's wal-fetch made (its stamp is not the starter's): idle rules apply again
    spool.write_want(d, names[0], served=True)
    proc.wait(15)
    assert "exiting (idle)" in (d / "prefetch.log").read_text()
    assert not [f for f in os.listdir(d) if len(f) == 24]  # it empties the stage on its way out


def test_starter_alive_reads_only_start_helpers_stamp() -> None:
    assert stage.starter_alive(f"{stage.STARTER_STAMP}{os.getpid()}-1")
    assert not stage.starter_alive(f"ask-{os.getpid()}-1") and not stage.starter_alive(f"done-{os.getpid()}-1")
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert not stage.starter_alive(f"{stage.STARTER_STAMP}{dead.pid}-1")
    assert not stage.starter_alive(f"{stage.STARTER_STAMP}x-1") and not stage.starter_alive(stage.STARTER_STAMP)


def _helper_answers(d: Path, name: str, verdict: str | None, data: bytes = b"", stale: bool = False,
                    ) -> threading.Thread:
    """Play the helper for the one-liner's own request: wait for it in `want`, then stage `data` under
    name, or answer `verdict` to its stamp (stale: to another stamp first, then stage the file)."""
    def play() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            req = spool.read_want(d)
            if req and req[0] == name and req[1].startswith(stage.SHELL_STAMP):
                break
            time.sleep(0.01)
        else:
            return
        if stale:
            spool.answer(d, name, "sh-.ask.someoneelse", "missing")
            time.sleep(0.3)
        if verdict:
            spool.answer(d, name, req[1], verdict)
        else:
            (d / spool.partial_name(name)).write_bytes(data)
            os.replace(d / spool.partial_name(name), d / name)

    t = threading.Thread(target=play)
    t.start()
    return t


@pytest.mark.parametrize("shell", list(SHELLS.values()))
def test_one_liner_asks_a_running_helper_itself(shell: str, staging: tuple[Path, Path, str, Path]) -> None:
    """A name not staged while a helper runs (its lock is there): the one-liner writes its own request and
    takes what the helper stages for it, or exits 1 on the helper's "missing" to that very request;
    a "missing" answered to another request is not taken as its own."""
    pgdata, d, cmd, marker = staging
    (d / "prefetch.lock").touch()
    name, hist = walgen.names(3, 1)[0], "00000002.history"
    data = walgen.segment(name)
    t = _helper_answers(d, name, None, data)
    rc, _ = _run_timed(shell, pgdata, cmd, name)
    t.join()
    assert rc == 0 and not marker.exists() and (pgdata / "pg_wal" / "RECOVERYXLOG").read_bytes() == data
    (pgdata / "pg_wal" / "RECOVERYXLOG").unlink()
    t = _helper_answers(d, hist, "missing")
    rc, took = _run_timed(shell, pgdata, cmd, hist)
    t.join()
    assert rc == 1 and not marker.exists() and not (pgdata / "pg_wal" / "RECOVERYXLOG").exists()
    assert took < 2.0, took
    t = _helper_answers(d, hist, None, b"1\t0/3000000\tno recovery target specified\n", stale=True)
    rc, took = _run_timed(shell, pgdata, cmd, hist)
    t.join()
    assert rc == 0 and not marker.exists() and took >= 0.25
    assert (pgdata / "pg_wal" / "RECOVERYXLOG").read_bytes().startswith(b"1\t0/3000000")


@pytest.mark.parametrize("shell", list(SHELLS.values()))
def test_one_liner_leaves_it_to_wal_fetch_when_the_helper_fails_or_is_gone(
        shell: str, staging: tuple[Path, Path, str, Path]) -> None:
    """The helper answers "failed" (it cannot prove the name absent), has exited (prefetch.exited), or is
    dead without a word (its lock left behind): wal-fetch answers -- at once, at once, after the bound."""
    pgdata, d, cmd, marker = staging
    name = walgen.names(3, 1)[0]
    (d / "prefetch.lock").touch()
    t = _helper_answers(d, name, "failed")
    rc, took = _run_timed(shell, pgdata, cmd, name)
    t.join()
    assert rc == 7 and marker.read_text().split("\n")[:3] == [d.name, "wal-fetch", name] and took < 2.0, took
    marker.unlink()
    (d / f"{name}.failed").unlink()
    (d / "prefetch.exited").touch()
    rc, took = _run_timed(shell, pgdata, cmd, name)
    assert rc == 7 and marker.exists() and took < 1.0, took
    assert spool.read_want(d)[1].startswith(stage.SHELL_STAMP)  # type: ignore[index]  # the earlier ask's
    marker.unlink()
    (d / "prefetch.exited").unlink()
    rc, took = _run_timed(shell, pgdata, cmd, name)
    assert rc == 7 and marker.exists() and 2.5 <= took < 20, took
    assert not (pgdata / "pg_wal" / "RECOVERYXLOG").exists()


def test_one_liner_names_the_helpers_files() -> None:
    """The one-liner's lock and exit markers are the helper's (pg/recovery.py cannot import ops/)."""
    from pitr.pg import recovery

    assert f"{spool.PREFETCHD}.lock" == recovery.STAGE_LOCK and recovery.STAGE_EXITED == stage.EXITED


@pytest.mark.parametrize("change", ["config", "server"])
def test_the_helper_leaves_when_its_settings_or_server_change(change: str,
                                                               fake: tuple[Path, Path, list[str]]) -> None:
    """The one-liner asks the helper without wal-fetch's settings check, so the helper leaves by itself when
    its config file is edited or the server it serves restarted (possibly with another environment), and
    says so (prefetch.exited): the one-liner's next miss goes to wal-fetch, which starts a current helper."""
    pgdata, repo, names = fake
    conf = repo.parent / "pitr.toml"
    conf.write_text(f'repo = "file://{repo}"\n')
    dead = subprocess.Popen(["true"])
    dead.wait()
    # left by a server that died (restore --replay starts the helper before it removes the file): no server
    (pgdata / "postmaster.pid").write_text(f"{dead.pid}\n/data\n")
    token = stage.new_token()
    d = stage.prepare(pgdata, token, None)
    assert d is not None
    env = {k: v for k, v in _env(repo).items() if k != "PITR_REPO"} | {"PITR_PREFETCH": "3", "PITR_STAGE": token}
    proc = stage.start_helper([PITR, "--config", str(conf)], env, d, pgdata, None, names[0])
    assert stage.wait_started(d, proc=proc), (d / "prefetch.log").read_text()
    _wait(lambda: (d / names[1]).exists(), "not staged")
    (pgdata / "postmaster.pid").write_text(f"{os.getpid()}\n/data\n")  # the server starts
    time.sleep(2.5)  # the helper has seen this server (not a restart: the file before named a dead one)
    assert proc.poll() is None, (d / "prefetch.log").read_text()
    other = subprocess.Popen(["sleep", "30"])
    try:
        if change == "config":
            conf.write_text(f'repo = "file://{repo}"\ncompress = "zstd:1"\n')
        else:
            (pgdata / "postmaster.pid").write_text(f"{other.pid}\n/data\n")  # another server now
        proc.wait(15)
    finally:
        other.kill()
        other.wait()
    log = (d / "prefetch.log").read_text()
    assert ("settings changed" if change == "config" else "the server restarted") in log, log
    assert (d / stage.EXITED).exists() and not (d / names[1]).exists()
