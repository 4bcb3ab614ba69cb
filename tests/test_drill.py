"""`pitr drill` on real PostgreSQL 15 and 18 (directory repository; S3 on moto for one case).

One archiving cluster per variant is shared by the module: 100 accounts -> backup -> more work
and a run of WAL switches (so that replay takes long enough to interrupt). Each test drills the
way cron would (as the postgres user) and checks what an operator would: the exit code, the
record in the repository, the rows the checks saw, `info` and `check --max-drill-age`, the
metrics, and that nothing is left running or on disk afterwards.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pitr.repo import drills
from pitr.repo.manifest import list_backup_ids
from pitr.storage.fs import FsStorage
from pitr.storage.s3 import S3Storage
from tests.conftest import PG_VERSIONS
from tests.support.faults import kill_env
from tests.support.maint import Repo, backup, start_repo
from tests.support.pg import IS_ROOT, PgCluster, as_pg_argv, chown_pg, make_tmpdir, pg_bin_dirs, pg_env, rmtree_pg
from tests.support.s3 import MotoServer

pytestmark = pytest.mark.pg
VARIANTS = [f"pg{v}-fs" for v in PG_VERSIONS] + (["pg15-s3"] if "15" in PG_VERSIONS else [])


@pytest.fixture(scope="module", params=VARIANTS)
def repo(request: pytest.FixtureRequest, pitr_exe: Path) -> Iterator[Repo]:
    version, kind = request.param[2:].split("-")
    base = make_tmpdir("pitr-drill-t-")
    moto: MotoServer | None = None
    mp = pytest.MonkeyPatch()  # in-process S3Storage (reading drill records) needs the credentials too
    cluster = PgCluster(pg_bin_dirs()[version], base / "src", name=f"drill-{request.param}")
    # the drills' TMPDIR: their work directories and servers are this module's alone to count, whatever
    # else (another test session, another xdist worker's `pitr drill`) runs on the machine meanwhile
    tmp = {"TMPDIR": str(base / "tmp")}
    (base / "tmp").mkdir()
    chown_pg(base / "tmp")
    try:
        if kind == "fs":
            root = base / "repo"
            r = start_repo(cluster, FsStorage(root), {"PITR_REPO": f"file://{root}"} | tmp, pitr_exe, root)
        else:
            moto = MotoServer().start()
            bucket = moto.create_bucket(f"drill-{uuid.uuid4().hex[:12]}")
            env = {"PITR_REPO": f"s3://{bucket}/prod"} | moto.env() | tmp
            for k, v in moto.env().items():
                mp.setenv(k, v)
            r = start_repo(cluster, S3Storage(bucket, "prod", endpoint=moto.endpoint), env, pitr_exe)
        if kind == "fs":  # a tablespace: its original location is the source's own, never the drill's
            (base / "ts").mkdir()
            chown_pg(base / "ts")
            cluster.sql(f"create tablespace ts location '{base / 'ts'}'")
            cluster.sql("create table ledger (id int primary key) tablespace ts")
            cluster.sql("insert into ledger select generate_series(1, 50)")
        cluster.sql("create table accounts (id int primary key, balance int not null)")
        cluster.sql("insert into accounts select g, 100 from generate_series(1, 100) g")
        backup(r)
        cluster.sql("update accounts set balance = 90 where id <= 10")
        r.churn(switches=12)  # a WAL chain for replay to walk (and a SIGINT to land in)
        if kind == "fs":
            backup(r)  # a second backup: --random-target draws between the two
            r.churn(switches=1)  # commits after it: any drawn time has a commit to stop at
        yield r
    finally:
        cluster.ensure_stopped()
        if moto is not None:
            moto.stop()
        mp.undo()
        rmtree_pg(base)


def drill_dirs(repo: Repo) -> set[str]:
    """The drills' work directories in the module's private TMPDIR."""
    return set(glob.glob(f"{repo.env['TMPDIR']}/pitr-drill-*"))


def drill_servers(repo: Repo) -> list[str]:
    """Command lines of running postgres processes on one of the module's drill directories."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "postgres" in cmd and f"{repo.env['TMPDIR']}/pitr-drill-" in cmd:
            out.append(cmd)
    return out


def records(repo: Repo) -> list[dict]:  # type: ignore[type-arg]
    return [drills.read(repo.storage, i) for i in drills.list_ids(repo.storage)]


def test_drill_passes_with_checks_and_shows_in_info_check_and_metrics(repo: Repo) -> None:
    before = drill_dirs(repo)
    if not records(repo):  # --max-drill-age before any drill: fails, naming the figure
        r = repo.pitr("check", "--max-drill-age", "1d", "--timeout", "30")
        assert r.returncode == 1
        assert "FAIL  drill-age: no passing drill is recorded in the repository" in r.stdout
    checks = ["select count(*) = 100 and sum(balance) = 9900 from accounts", "select balance > 0 from accounts"]
    if repo.fs_root is not None:
        checks.append("select count(*) = 50 from ledger")  # restored into a relocated tablespace
    ts_before = sorted(os.listdir(repo.fs_root.parent / "ts")) if repo.fs_root is not None else []
    r = repo.pitr("drill", "--json", "--replay-timeout", "240", *(a for c in checks for a in ("--check", c)))
    assert r.returncode == 0, r.stdout + r.stderr
    rec = json.loads(r.stdout)
    assert rec["passed"] is True
    done = [s for s in rec["steps"] if s["name"] == "check"]
    assert [c["passed"] for c in done] == [True] * len(checks)
    assert done[1]["message"] == "100 row(s), all true"
    if repo.fs_root is not None:
        assert sorted(os.listdir(repo.fs_root.parent / "ts")) == ts_before  # the source's tablespace untouched
    am = next(s for s in rec["steps"] if s["name"] == "amcheck")
    if repo.cluster.major == 15:
        assert am["passed"] is True, am  # Debian's PostgreSQL 15 ships pg_amcheck
    else:
        assert am["passed"] in (True, None) and am["message"], am  # absent: reported, not hidden
    assert rec["rto_seconds"] > 0 and rec["rto_checks_seconds"] >= rec["rto_seconds"]
    assert rec["bytes_restored"] > 1 << 20 and rec["wal_segments"] >= 1
    assert rec["pg_version"].startswith(str(repo.cluster.major))
    assert rec["reached"]["lsn"]
    stored = drills.read(repo.storage, rec["id"])
    assert stored["passed"] is True and stored["steps"] == rec["steps"]
    assert drill_dirs(repo) == before and not drill_servers(repo)

    info = json.loads(repo.pitr("info", "--json").stdout)
    assert info["drill"]["id"] == rec["id"] and info["drill"]["passed"] is True
    assert info["drill"]["target"] == "end of the archive" and info["drill"]["rto_seconds"] == rec["rto_seconds"]
    assert f"drill {rec['id']})" in repo.pitr("info").stdout

    r = repo.pitr("check", "--max-drill-age", "1d", "--max-backup-age", "1d", "--json", "--timeout", "30")
    out = json.loads(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert out["newest_drill"] == rec["id"] and out["drill_age_seconds"] < 600
    time.sleep(1.2)
    r = repo.pitr("check", "--max-drill-age", "1s", "--timeout", "30")
    assert r.returncode == 1
    assert f"FAIL  drill-age: the newest passing drill ({rec['id']}) is" in r.stdout
    assert "over the limit of 1s" in r.stdout and "drill-age" in r.stderr

    from prometheus_client.parser import text_string_to_metric_families

    text = repo.pitr("metrics").stdout
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    value = {n: f.samples[0].value for n, f in fams.items() if f.samples}
    assert value["pitr_drill_last_success"] == 1.0
    assert value["pitr_drill_last_rto_seconds"] == rec["rto_seconds"]
    assert 0 <= value["pitr_drill_last_age_seconds"] < 600
    assert value["pitr_wal_archived_segments"] >= 12
    assert value["pitr_encryption_enabled"] == 0 and value["pitr_object_lock_enabled"] == 0
    full = [s for s in fams["pitr_backup_last_size_bytes"].samples if s.labels == {"type": "full"}]
    assert full and full[0].value > 1 << 20


def test_failing_check_is_recorded_and_leaves_nothing(repo: Repo) -> None:
    if repo.fs_root is None:
        pytest.skip("the S3 variant proves the passing drill; failures are storage-independent")
    if repo.cluster.major != 18 and "18" in PG_VERSIONS:
        # the passing drill runs on both versions; how a failing step is recorded does not depend on it
        pytest.skip("checked on PostgreSQL 18 only (the failure path does not depend on the version)")
    before = drill_dirs(repo)
    n = len(records(repo))
    r = repo.pitr("drill", "--no-amcheck", "--replay-timeout", "240",
                  "--check", "select count(*) = 100 from accounts",
                  "--check", "select balance = 100 from accounts order by id")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED" in r.stdout and "row 1 of 100: the first column is False, not true" in r.stdout
    assert "failed (check)" in r.stderr and "Traceback" not in r.stderr
    recs = records(repo)
    assert len(recs) == n + 1 and recs[-1]["passed"] is False
    assert [s["passed"] for s in recs[-1]["steps"]] == [True, None, True, False]
    assert drill_dirs(repo) == before and not drill_servers(repo)

    r = repo.pitr("metrics")
    assert "\npitr_drill_last_success 0\n" in r.stdout

    # a target past the archive: the restore step fails, is recorded, nothing is left
    r = repo.pitr("drill", "--target-lsn", "FFFF/0")
    assert r.returncode == 1 and "failed (restore)" in r.stderr, r.stdout + r.stderr
    last = records(repo)[-1]
    assert last["passed"] is False and [s["name"] for s in last["steps"]] == ["restore"]
    assert last["error"] and drill_dirs(repo) == before and not drill_servers(repo)


def test_random_target_drills_a_time_inside_the_window(repo: Repo) -> None:
    if repo.fs_root is None or repo.cluster.major != 15:
        pytest.skip("one variant is enough for --random-target")
    before = drill_dirs(repo)
    argv = ["drill", "--random-target", "--no-amcheck", "--json", "--replay-timeout", "240",
            "--check", "select count(*) = 100 from accounts"]
    if IS_ROOT:  # as root (the copy then runs as the postgres OS user), the way a root cron job would
        r = subprocess.run([str(repo.pitr_exe), *argv], env=pg_env(repo.cluster.env() | repo.env), cwd="/tmp",
                           capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        repo.fix_owner()  # the record root wrote: back to postgres, which runs the other tests' pitr
    else:
        r = repo.pitr(*argv)
    assert r.returncode == 0, r.stdout + r.stderr
    assert drill_dirs(repo) == before and not drill_servers(repo)
    rec = json.loads(r.stdout)
    ids = list_backup_ids(repo.storage)
    assert rec["target"]["kind"] == "time" and rec["target"]["random"] is True
    assert rec["backup"]["id"] in ids and rec["reached"]["stop_reason"]
    r = repo.pitr("drill", "--random-target", "--target", "immediate")
    assert r.returncode == 2 and "exclude each other" in r.stderr


def test_drill_into_pgdata_with_check_file_and_keep(repo: Repo, tmp_pg_dir: Path) -> None:
    if repo.fs_root is None or repo.cluster.major != 15:
        pytest.skip("one variant is enough for --pgdata/--keep/--check-file")
    before = drill_dirs(repo)
    checks = tmp_pg_dir / "checks.sql"
    checks.write_text("-- the accounts survived; a ';' in a string is no statement end\n"
                      "select count(*) = 100 from accounts;\nselect 'a;b' = 'a;b';\n")
    os.chmod(checks, 0o644)
    dest = tmp_pg_dir / "copy"
    r = repo.pitr("drill", "--pgdata", str(dest), "--keep", "--no-amcheck", "--check-file", str(checks), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    rec = json.loads(r.stdout)
    assert [s["sql"] for s in rec["steps"] if s["name"] == "check"] == [
        "select count(*) = 100 from accounts", "select 'a;b' = 'a;b'"]
    assert rec["kept"] == str(dest) and (dest / "PG_VERSION").is_file() and not drill_servers(repo)
    kept = Path(rec["kept_workdir"])  # the relocated tablespace the kept copy links to
    try:
        assert sorted(os.listdir(kept)) == ["server.log", "tablespaces"]  # no socket dir, no trust pg_hba.conf
        assert (dest / "pg_tblspc").is_dir() and all(
            os.path.realpath(ln).startswith(str(kept)) for ln in (dest / "pg_tblspc").iterdir())
    finally:
        rmtree_pg(kept)
    assert drill_dirs(repo) == before
    r = repo.pitr("drill", "--pgdata", str(dest))
    assert r.returncode == 2 and "is not an empty directory" in r.stderr


def test_sigint_mid_replay_leaves_nothing_behind(repo: Repo) -> None:
    if repo.fs_root is None or repo.cluster.major != 15:
        pytest.skip("one variant is enough for the interrupt")
    before = drill_dirs(repo)
    n = len(records(repo))
    # the drill holds still right after it started its replay server (a test-only pause point), so the
    # interrupt lands mid-replay however fast the replay itself is
    pause = Path(repo.env["TMPDIR"]) / f"pause-{uuid.uuid4().hex}"
    env = pg_env(repo.cluster.env() | repo.env | kill_env("pitr.pg.server:PrivateServer.start", "after", pause=pause))
    first = list_backup_ids(repo.storage)[0]
    # SIGINT at its default in the child: a pytest-xdist worker ignores SIGINT, and an ignored signal stays
    # ignored across exec, so Python would never turn Ctrl-C into KeyboardInterrupt
    p = subprocess.Popen(as_pg_argv([repo.pitr_exe, "drill", "--no-amcheck", "--backup", first]), env=env, cwd="/tmp",
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not Path(f"{pause}.reached").exists():
            assert p.poll() is None, p.communicate()
            if time.monotonic() > deadline:
                pytest.fail("the drill never started its replay server")
            time.sleep(0.02)
        # the replay server: a postgres on the drill dir with restore's settings (not the checks' hba_file)
        assert [c for c in drill_servers(repo) if "hot_standby=on" in c and "hba_file" not in c]
        os.kill(p.pid, signal.SIGINT)  # setpriv execs: p.pid is pitr
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, out + err
    assert "drill interrupted" in err and "Traceback" not in err
    assert drill_dirs(repo) == before and not drill_servers(repo)
    assert len(records(repo)) == n


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (killed; PID 1 of a container may never reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_hung_pg_amcheck_fails_the_drill_within_its_bound(repo: Repo, tmp_pg_dir: Path) -> None:
    """A pg_amcheck that never ends (here a script that sleeps, in a --pg-bin of the real binaries) is
    killed with its children at --amcheck-timeout: the drill fails the amcheck step, saying so, and
    leaves nothing running."""
    if repo.fs_root is None or repo.cluster.major != 15:
        pytest.skip("one variant is enough for the amcheck bound")
    before = drill_dirs(repo)
    n = len(records(repo))
    fake = tmp_pg_dir / "bin"
    fake.mkdir()
    for exe in pg_bin_dirs()["15"].iterdir():
        if exe.name != "pg_amcheck":
            (fake / exe.name).symlink_to(exe)
    (fake / "pg_amcheck").write_text(f"#!/bin/sh\necho $$ > {tmp_pg_dir}/amcheck.pid\nsleep 600 &\n"
                                     f"echo $! > {tmp_pg_dir}/sleep.pid\nwait\n")
    os.chmod(fake / "pg_amcheck", 0o755)
    chown_pg(fake, recursive=True)
    r = repo.pitr("drill", "--json", "--pg-bin", str(fake), "--amcheck-timeout", "3", "--replay-timeout", "240",
                  timeout=200)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "failed (amcheck)" in r.stderr and "Traceback" not in r.stderr
    rec = json.loads(r.stdout)
    [step] = [s for s in rec["steps"] if s["name"] == "amcheck"]
    assert step["passed"] is False
    assert step["message"].startswith("pg_amcheck did not finish within 3s and was stopped"), step
    assert 3 <= step["seconds"] < 20
    pids = [int((tmp_pg_dir / f).read_text()) for f in ("amcheck.pid", "sleep.pid")]
    assert all(_gone(pid) for pid in pids), pids
    assert records(repo)[-1]["passed"] is False and len(records(repo)) == n + 1
    assert drill_dirs(repo) == before and not drill_servers(repo)
