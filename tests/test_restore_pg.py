"""Point-in-time restore on real PostgreSQL 15 and 18, from a directory and from S3 (moto).

One source cluster per (server version, repo kind) lives through the invoice story and is shared
by this module's tests:

    2,000 invoices -> backup B1 -> more work -> T (1 s of quiet each side; restore point
    'before-sync'; LSN at T) -> a faulty sync deletes 200 invoices -> more work -> backup B2
    (directory repo only) -> more work (the final state)

Each test restores with `pitr restore` run the way a DBA runs it (as the postgres user, or as
root) and checks what a DBA would: the invoices are back, table checksums equal those taken at
T, work after T is absent, PostgreSQL's own tools (pg_amcheck, pg_checksums) vouch for the copy,
and refused restores leave the directory exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ClusterFactory
from tests.support.maint import new_repo, start_source
from tests.support.pg import (
    IS_ROOT,
    PgCluster,
    chown_pg,
    make_tmpdir,
    pg_env,
    rmtree_pg,
    run_as_postgres,
)
from tests.support.s3 import MotoServer

pytestmark = pytest.mark.pg
TABLES = ("invoices", "audit_log", "payments")


@dataclass
class Story:
    kind: str
    src: PgCluster
    base: Path
    env: dict[str, str]  # reaches the repo (pitr and the servers)
    pitr_exe: Path
    b1: str = ""
    b2: str = ""
    t: str = ""  # server clock, ISO UTC
    t_lsn: str = ""
    at_t: dict[str, str] = field(default_factory=dict)
    final: dict[str, str] = field(default_factory=dict)
    n: int = 0

    def pitr(self, *args: str | Path, as_root: bool = False, check: bool = True,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
        argv = [str(self.pitr_exe), *map(str, args)]
        if as_root:
            p = subprocess.run(argv, env=pg_env(self.env), capture_output=True, text=True, timeout=timeout,
                               cwd="/tmp", stdin=subprocess.DEVNULL)
        else:
            p = run_as_postgres(argv, env=self.env, cwd="/tmp", check=False, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"pitr {' '.join(map(str, args))} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def restore(self, dest: Path, *args: str, as_root: bool = False) -> dict:  # type: ignore[type-arg]
        p = self.pitr("restore", "--pgdata", dest, "--json", "--replay-timeout", "240", *args, as_root=as_root)
        return json.loads(p.stdout)  # type: ignore[no-any-return]

    def new_dir(self, name: str) -> PgCluster:
        self.n += 1
        return PgCluster(self.src.bindir, self.base / f"{name}{self.n}", name=name)

    def state(self, pg: PgCluster) -> dict[str, str]:
        return {t: pg.table_md5(t) for t in TABLES}


def mark_time(pg: PgCluster, gap: float = 1.0) -> tuple[str, str]:
    time.sleep(gap)
    t, lsn = pg.sql("select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US')"
                    " || '+00:00', pg_current_wal_lsn()::text")[0]
    time.sleep(gap)
    return str(t), str(lsn)


def work(pg: PgCluster, label: str, rows: int = 200) -> None:
    pg.sql(f"insert into audit_log (note) select '{label} ' || g from generate_series(1, {rows}) g")
    pg.sql(f"insert into payments (invoice_id, amount) select g, 10 from generate_series(1, {rows // 4}) g")


def start_story(kind: str, bindir: Path, pitr_exe: Path, moto: MotoServer | None) -> Story:
    base = make_tmpdir("pitr-rs-")
    env = new_repo(kind, base, moto)[0]
    src = start_source(PgCluster(bindir, base / "src", name=f"src-{kind}"), env, pitr_exe)
    st = Story(kind, src, base, env, pitr_exe)
    try:
        src.sql("create table invoices (id int primary key, customer text not null, amount numeric(12,2) not null,"
                " issued date not null, paid boolean not null default false)")
        src.sql("insert into invoices select g, 'customer-' || (g % 97), round((g * 7.31)::numeric % 5000, 2),"
                " date '2026-01-01' + (g % 300), g % 3 = 0 from generate_series(1, 2000) g")
        src.sql("create table audit_log (id bigserial primary key, note text,"
                " at timestamptz default clock_timestamp())")
        src.sql("create table payments (id serial primary key, invoice_id int, amount numeric(12,2))")
        st.b1 = st.pitr("backup", "--dbname", src.conninfo, "--pgdata", src.data).stdout.split()[-1]
        for i in range(3):
            work(src, f"before T {i}")
        src.wait_archived(src.switch_wal())
        st.at_t = st.state(src)
        st.t, st.t_lsn = mark_time(src)
        st.pitr("restore-point", "before-sync", "--no-wait", "--dbname", src.conninfo)
        time.sleep(1)
        deleted = src.scalar("with d as (delete from invoices where id % 10 = 7 returning 1) select count(*) from d")
        assert deleted == 200
        work(src, "after T")
        src.sql("update payments set amount = amount + 1 where id % 2 = 0")
        if kind == "fs":  # the S3 story needs only B1 (which backup a target picks is repo-independent)
            st.b2 = st.pitr("backup", "--dbname", src.conninfo, "--pgdata", src.data).stdout.split()[-1]
        work(src, "final")
        src.sql("create index on audit_log (at)")
        st.final = st.state(src)
        src.wait_archived(src.switch_wal())
        assert st.at_t["invoices"].startswith("2000:") and st.final["invoices"].startswith("1800:")
    except BaseException:
        src.ensure_stopped()
        raise
    return st


@pytest.fixture(scope="module")
def story_fs(pg_bindir: Path, pitr_exe: Path) -> Iterator[Story]:
    st = start_story("fs", pg_bindir, pitr_exe, None)
    yield st
    st.src.ensure_stopped()
    rmtree_pg(st.base)


@pytest.fixture(scope="module")
def story_s3(pg_bindir: Path, pitr_exe: Path, moto_env: MotoServer) -> Iterator[Story]:
    if not moto_env.up:
        moto_env.recover()
    st = start_story("s3", pg_bindir, pitr_exe, moto_env)
    yield st
    st.src.ensure_stopped()
    rmtree_pg(st.base)


@pytest.fixture(params=["fs", "s3"])
def story(request: pytest.FixtureRequest, pg_version: str) -> Story:
    return request.getfixturevalue(f"story_{request.param}")  # type: ignore[no-any-return]


def start_restored(st: Story, pg: PgCluster, env: dict[str, str] | None = None) -> PgCluster:
    """Start a restored (and already promoted) copy on its own port/socket."""
    pg.append_conf()
    pg.start(env=env if env is not None else {})
    assert pg.scalar("select pg_is_in_recovery()") is False
    return pg


def vouch(pg: PgCluster) -> None:
    """PostgreSQL's own tools on the copy: pg_amcheck (running), then pg_checksums (stopped)."""
    r = pg.run("pg_amcheck", "--install-missing", "--all", "--heapallindexed", check=False)
    assert r.returncode == 0, f"pg_amcheck found problems:\n{r.stdout}\n{r.stderr}"
    pg.stop()
    r = pg.run("pg_checksums", "--check", "-D", str(pg.data), check=False)
    assert r.returncode == 0 and "Bad checksums:  0" in r.stdout, r.stdout + r.stderr


# --------------------------------------------------------------------------- the story

def test_invoice_story(story: Story) -> None:
    """Restore to T (between B1 and B2 in the directory repo: B1 is used): all 2,000 invoices are
    back as they were at T, nothing done after T is there, and PostgreSQL's tools vouch for the copy."""
    st = story
    a = st.new_dir("a")
    out = st.restore(a.data, "--target-time", st.t, "--replay", "--archive-mode", "off")
    assert out["backup"]["id"] == st.b1
    rp = out["replay"]
    assert rp["reached"] and rp["action"] == "promote" and "recovery stopping before" in rp["stop_reason"], rp
    assert rp["last_transaction_time"] and rp["last_replayed_lsn"] and rp["new_timeline"]
    assert out["seconds"] > 0 and out["files"]["written"] > 900
    start_restored(st, a)
    assert st.state(a) == st.at_t, "the copy is not the state at T"
    assert a.scalar("select count(*) from invoices") == 2000
    assert a.scalar("select count(*) from audit_log where note like 'after T%' or note like 'final%'") == 0
    vouch(a)


def test_restore_onto_a_new_timeline(story_fs: Story) -> None:
    """A copy restored to T and promoted keeps archiving into the same repo (--archive-mode preserve,
    the default): its new timeline's history reaches the archive, work goes on there, and a later
    restore to a point on that timeline reaches exactly that state."""
    st = story_fs
    a = st.new_dir("tl")
    out = st.restore(a.data, "--target-time", st.t, "--replay")
    rp = out["replay"]
    assert rp["reached"] and rp["new_timeline"] == 2 and rp["history_archived"] is True, rp
    start_restored(st, a, st.env)  # a primary on timeline 2, archiving like the original
    assert st.state(a) == st.at_t
    a.sql("update invoices set paid = true where id <= 100")
    work(a, "timeline 2")
    a.wait_archived(a.switch_wal())
    at_t2 = st.state(a)
    t2, _ = mark_time(a)
    a.sql("delete from invoices where id > 1000")
    work(a, "after T2")
    a.wait_archived(a.switch_wal())
    a.stop()

    c = st.new_dir("c")
    out = st.restore(c.data, "--target-time", t2, "--replay", "--archive-mode", "off")
    assert out["backup"]["id"] == st.b1 and out["timeline"]["resolved"] == 2
    assert [p["timeline"] for p in out["timeline"]["path"]] == [1, 2]
    assert out["replay"]["reached"] and out["replay"]["new_timeline"]
    start_restored(st, c)
    assert st.state(c) == at_t2
    assert c.scalar("select count(*) from invoices where paid and id <= 100") == 100
    c.stop()


# --------------------------------------------------------------------------- more targets (directory repo)

def test_no_target_reaches_the_final_state_and_delta_keeps_matching_files(story_fs: Story) -> None:
    """As root: the files go to the directory's owner and the replay server runs as that user."""
    st = story_fs
    pg = st.new_dir("latest")
    out = st.restore(pg.data, "--target-timeline", "1", "--replay", "--archive-mode", "off", as_root=IS_ROOT)
    assert out["backup"]["id"] == st.b2 and out["target"]["kind"] == "latest"
    assert out["replay"]["reached"] and out["replay"]["stop_reason"] is None
    if IS_ROOT:
        owners = {p.lstat().st_uid for p in [pg.data, *pg.data.rglob("*")]}
        assert owners == {pg.data.parent.stat().st_uid} and 0 not in owners
    start_restored(st, pg)
    assert st.state(pg) == st.final
    assert pg.scalar("select count(*) from pg_indexes where tablename = 'audit_log'") == 2
    pg.stop()

    # --delta over the stopped copy: most files match and are kept; the result is the same
    out = st.restore(pg.data, "--delta", "--target-timeline", "1", "--replay", "--archive-mode", "off")
    files = out["files"]
    assert files["kept"] > 0.5 * (files["kept"] + files["written"]), files
    assert files["removed"] > 0  # at least the WAL the first copy wrote since
    start_restored(st, pg)
    assert st.state(pg) == st.final
    vouch(pg)


@pytest.mark.parametrize("how", ["name-pause", "lsn-shutdown"])
def test_target_actions_pause_and_shutdown(story_fs: Story, how: str) -> None:
    """The copy stays in recovery at the target; started again (paused there) it shows the state at T."""
    st = story_fs
    pg = st.new_dir(how)
    target, action = how.split("-")
    # `pitr restore-point` recorded where the point is, so restore picks B1 (B2 came after it) unprompted
    args = ["--target-name", "before-sync"] if target == "name" else ["--target-lsn", st.t_lsn]
    out = st.restore(pg.data, *args, "--target-action", action, "--replay", "--archive-mode", "off")
    rp = out["replay"]
    assert rp["reached"] and rp["action"] == action and rp["new_timeline"] is None, rp
    assert out["backup"]["id"] == st.b1
    assert (pg.data / "recovery.signal").exists()  # not promoted: starting it again resumes recovery
    assert not (pg.data / "postmaster.pid").exists()
    pg.append_conf()
    pg.start(extra_opts={"recovery_target_action": "pause"})
    deadline = time.monotonic() + 60
    while pg.scalar("select pg_is_wal_replay_paused()") is not True:
        assert time.monotonic() < deadline, pg.log_tail()
        time.sleep(0.2)
    assert st.state(pg) == st.at_t
    pg.stop()


def test_recovery_short_of_the_target_is_an_error(story_fs: Story) -> None:
    """A transaction that never committed: PostgreSQL (14+) stops at the end of the archive; so do we."""
    st = story_fs
    pg = st.new_dir("short")
    xid = int(st.src.scalar("select txid_current()")) + 100000
    p = st.pitr("restore", "--pgdata", pg.data, "--target-xid", str(xid), "--replay", "--archive-mode", "off",
                "--replay-timeout", "240", check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "recovery ended before reaching the target" in p.stderr
    assert "recovery ended before configured recovery target was reached" in p.stderr  # the server's own line
    assert "Traceback" not in p.stderr and "server log is" in p.stderr
    assert not pg.is_running()


def test_dry_run_prints_the_plan_and_changes_nothing(story_fs: Story) -> None:
    st = story_fs
    dest = st.base / "dry" / "data"
    p = st.pitr("restore", "--pgdata", dest, "--dry-run", "--target-time", st.t, "--json")
    out = json.loads(p.stdout)
    assert out["dry_run"] and out["backup"]["id"] == st.b1 and "files" not in out
    assert out["target"]["time_utc"].startswith(st.t[:19])
    assert out["wal"]["first"] <= out["wal"]["last"] and out["wal"]["segments"] >= 2
    assert not (st.base / "dry").exists()
    text = st.pitr("restore", "--pgdata", dest, "--dry-run", "--target-time", st.t).stdout
    assert st.b1 in text and "UTC" in text and out["wal"]["first"] in text and "nothing was changed" in text


def snapshot(path: Path) -> dict[str, tuple[int, int, str]] | None:
    if not path.exists():
        return None
    out = {}
    for p in sorted(path.rglob("*")):
        s = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else ""
        out[str(p.relative_to(path))] = (s.st_mode, s.st_size, digest)
    return out


def test_bad_input_is_one_sentence_and_leaves_the_directory_alone(story_fs: Story) -> None:
    st = story_fs
    empty = st.base / "bad-empty"
    empty.mkdir()
    chown_pg(empty)
    full = st.base / "bad-full"
    full.mkdir()
    (full / "notes.txt").write_text("do not lose me")
    chown_pg(full, recursive=True)
    cases = [
        (empty, ["--target-time", "2001-01-01 00:00:00+00"], "before the oldest backup"),
        (empty, ["--target-time", "2099-01-01 00:00:00"], "past the archive"),
        (empty, ["--backup", "20990101T000000Z"], "does not exist"),
        (empty, ["--target-time", "not a time at all"], "cannot read the target time"),
        (full, [], "not empty"),
        (st.src.data, [], "running PostgreSQL server"),
        (st.src.data, ["--delta"], "running PostgreSQL server"),
        # a dry run answers "would it work?": the destination checks run too
        (st.src.data, ["--delta", "--dry-run"], "running PostgreSQL server"),
        (full, ["--dry-run"], "not empty"),
    ]
    for dest, args, words in cases:
        before = snapshot(dest) if dest != st.src.data else None
        p = st.pitr("restore", "--pgdata", dest, *args, check=False)
        assert p.returncode in (1, 2), (args, p.stdout, p.stderr)
        assert words in p.stderr, (args, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert lines[0].startswith("pitr: error: ") and len(lines) <= 2 and "Traceback" not in p.stderr, p.stderr
        if dest != st.src.data:
            assert snapshot(dest) == before, args
    assert st.src.is_running() and st.src.scalar("select count(*) from invoices") == 1800
    assert os.listdir(empty) == [] and (full / "notes.txt").read_text() == "do not lose me"


def test_independent_backup_with_a_tablespace(cluster_factory: ClusterFactory, pitr_exe: Path) -> None:
    """A backup made without `pitr backup` (PostgreSQL's low-level API, tests/support/synthbackup.py)
    restores too, tablespace included: the original location is busy, so it is remapped."""
    src = cluster_factory("ts-src")
    repo = src.base.parent / "ts-repo"
    env = {"PITR_REPO": str(repo)}
    src.initdb(f"archive_mode = on\narchive_command = '{pitr_exe} wal-push %p'\n")
    src.start(env=env)
    run_as_postgres([pitr_exe, "init", "-d", src.conninfo], env=env)
    ts_src = src.base / "ts"
    ts_src.mkdir()
    chown_pg(ts_src)
    src.sql(f"create tablespace fast location '{ts_src}'")
    src.sql("create table hot (id int primary key, v text) tablespace fast")
    src.sql("insert into hot select g, md5(g::text) from generate_series(1, 5000) g")
    oid = str(src.scalar("select oid from pg_tablespace where spcname = 'fast'"))
    from pitr.storage.fs import FsStorage
    from tests.support.synthbackup import synth_backup

    synth_backup(src.conninfo, src.data, FsStorage(repo))
    chown_pg(repo, recursive=True)
    src.sql("update hot set v = 'changed' where id % 7 = 0")
    src.sql("create index on hot (v) tablespace fast")
    final = src.table_md5("hot")
    src.wait_archived(src.switch_wal())

    dest = PgCluster(src.bindir, src.base.parent / "ts-copy", name="ts-copy")
    argv: list[str | os.PathLike[str]] = [pitr_exe, "restore", "--pgdata", dest.data, "--replay", "--archive-mode",
                                          "off", "--json"]
    p = run_as_postgres(argv, env=env, check=False)
    assert p.returncode == 1 and f"tablespace {oid} is not empty" in p.stderr and not dest.data.exists()
    ts_new = dest.base / "ts"
    out = json.loads(run_as_postgres([*argv, "--tablespace-map", f"{oid}={ts_new}"], env=env).stdout)
    assert out["replay"]["reached"]
    assert os.readlink(dest.data / "pg_tblspc" / oid) == str(ts_new)
    # PostgreSQL rebuilt the link from tablespace_map and renamed the file when recovery started
    assert (dest.data / "tablespace_map.old").read_text().strip() == f"{oid} {ts_new}"
    dest.append_conf()
    dest.start()
    try:
        assert dest.table_md5("hot") == final
        where = dest.scalar("select pg_tablespace_location(oid) from pg_tablespace where spcname = 'fast'")
        assert where == str(ts_new)
        r = dest.run("pg_amcheck", "--install-missing", "--all", check=False)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        dest.stop()
    assert src.table_md5("hot") == final  # the source's tablespace was not touched
