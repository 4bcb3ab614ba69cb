"""`pitr backup` and `pitr restore-point` against real PostgreSQL 15 and 18 servers, run the way a
DBA runs them (as the postgres OS user, on the database host), into a local directory and S3 (moto).

What a user would check: the backup is listed (and only when complete), its manifest matches the
data directory, what PostgreSQL says to skip is skipped while the directories stay, tablespaces
are in, a backup whose WAL cannot reach the archive fails and is not listed, a killed backup is
not listed and does not leave the server in backup mode, damaged pages are reported, and
PostgreSQL itself can start from the files the manifest describes and replay to the right state.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import re
import signal
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import blake3
import numpy as np
import psycopg
import pytest

from pitr.errors import StorageError
from pitr.ops.base.backup import new_backup_id
from pitr.ops.base.backup_files import SourceFile
from pitr.ops.base.backup_store import Pipeline, StoreOptions, is_internal_abort
from pitr.pg import pagecheck
from pitr.repo import envelope
from pitr.repo.format import BLAKE3_MANIFEST_FORMAT, backup_dir, wal_key
from pitr.repo.manifest import Manifest, list_backup_ids, read_manifest
from pitr.storage.base import Storage
from pitr.storage.fs import FsStorage
from pitr.storage.memory import MemoryStorage
from pitr.storage.s3 import S3Storage
from tests.conftest import ClusterFactory
from tests.support.pg import PgCluster, as_pg_argv, chown_pg, pg_env, run_as_postgres
from tests.support.s3 import MotoServer

pytestmark = pytest.mark.pg

F = TypeVar("F", bound=Callable[..., None])
SKIPPED_DIRS = ("pg_wal", "pg_wal/archive_status", "pg_replslot", "pg_dynshmem", "pg_notify", "pg_serial",
                "pg_snapshots", "pg_stat_tmp", "pg_subtrans")


@dataclass
class Setup:
    cluster: PgCluster
    storage: Storage
    env: dict[str, str]  # how pitr (and the server's archive_command) reaches the repository
    pitr_exe: Path
    base: Path

    def pitr(self, *args: str, timeout: float = 180, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
        return run_as_postgres([self.pitr_exe, *args], env=self.cluster.env() | self.env | (env or {}),
                               cwd="/tmp", check=False, timeout=timeout)

    def backup(self, *args: str) -> tuple[str, subprocess.CompletedProcess[str]]:
        r = self.pitr("backup", *args)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout.strip().splitlines()[-1], r

    def info(self) -> dict:  # type: ignore[type-arg]
        r = self.pitr("info", "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)  # type: ignore[no-any-return]


def start(cluster: PgCluster, storage: Storage, env: dict[str, str], pitr_exe: Path, base: Path,
          archive_command: str | None = None, conf: str = "") -> Setup:
    cmd = archive_command or f"{pitr_exe} wal-push %p"
    cluster.initdb(f"archive_mode = on\narchive_command = '{cmd}'\n{conf}").start(env=env)
    s = Setup(cluster, storage, env, pitr_exe, base)
    r = s.pitr("init")
    assert r.returncode == 0, r.stderr
    return s


@pytest.fixture
def local(cluster_factory: ClusterFactory, tmp_pg_dir: Path, pitr_exe: Path) -> Setup:
    repo = tmp_pg_dir / "repo"
    repo.mkdir()
    chown_pg(repo)
    return start(cluster_factory(), FsStorage(repo), {"PITR_REPO": str(repo)}, pitr_exe, tmp_pg_dir)


def only_pg(version: str) -> Callable[[F], F]:
    """Run a test on one server version only (its code path does not depend on the version)."""
    def mark(fn: F) -> F:
        fn._only_pg = version  # type: ignore[attr-defined]
        return fn
    return mark


@pytest.fixture(autouse=True)
def _only_pg(request: pytest.FixtureRequest) -> None:
    """Skip the other versions before the cluster fixtures spend time on them."""
    want = getattr(request.function, "_only_pg", None)
    if want and request.getfixturevalue("pg_version") != want:
        pytest.skip(f"checked on PostgreSQL {want} only (the code path does not depend on the version)")


def sha(path: Path) -> str:
    """The file's BLAKE3: what a manifest entry binds since envelope version 2."""
    return blake3.blake3(path.read_bytes()).hexdigest()


def list_files(root: Path) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names}


def decode_file(storage: Storage, m: Manifest, path: str) -> bytes:
    e = next(f for f in m.files if f.path == path)
    if e.object is None:
        return b""
    return envelope.decode(storage.get_range(backup_dir(m.id) + e.object, e.offset, e.length), path)


class Writer:
    """Inserts rows in a loop from another thread: a little write load during a backup."""

    def __init__(self, cluster: PgCluster) -> None:
        self.cluster = cluster
        self.stop = threading.Event()
        self.rows = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with self.cluster.connect() as conn:
            while not self.stop.is_set():
                conn.execute("insert into load select g, md5(random()::text) from generate_series(1, 200) g")
                self.rows += 200
                time.sleep(0.01)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def reconstruct(s: Setup, m: Manifest, dest: PgCluster, spc_new: dict[str, Path]) -> None:
    """Rebuild a data directory from the manifest alone (each file decoded from its object), the
    backup_label and tablespace_map the backup stored, and recovery settings that fetch WAL with
    pitr: what a restore does, written independently of pitr's restore so it can judge the backup."""
    root = dest.data
    root.mkdir(mode=0o700)
    links = {t.oid for t in m.tablespaces}

    def where(rel: str) -> Path:
        parts = rel.split("/")
        if parts[0] == "pg_tblspc" and len(parts) > 2 and parts[1] in links:
            return spc_new[parts[1]].joinpath(*parts[2:])
        return root / rel

    for d in sorted(m.directories, key=lambda x: x.path.count("/")):
        where(d.path).mkdir(mode=d.mode, parents=True, exist_ok=True)
    for f in m.files:
        p = where(f.path)
        data = decode_file(s.storage, m, f.path)
        assert len(data) == f.size and (f.size == 0 or (f.sha256, f.blake3) == ("", blake3.blake3(data).hexdigest()))
        p.write_bytes(data)
        os.chmod(p, f.mode)
    (root / "backup_label").write_text(m.backup_label)
    if m.tablespace_map:
        lines = [f"{oid} {spc_new[oid]}" for oid, _ in (ln.split(" ", 1) for ln in m.tablespace_map.splitlines())]
        (root / "tablespace_map").write_text("\n".join(lines) + "\n")
    (root / "recovery.signal").write_text("")
    dest.append_conf(f"archive_mode = off\nrestore_command = '{s.pitr_exe} wal-fetch %f %p'\n")
    for p in [root, *spc_new.values()]:
        chown_pg(p, recursive=True)


def wait_promoted(c: PgCluster, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if c.scalar("select not pg_is_in_recovery()"):
                return
        except psycopg.OperationalError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"restored cluster did not finish recovery\n{c.log_tail()}")


# --------------------------------------------------------------------------- the main story

def test_backup_of_a_running_cluster(local: Setup, pg_version: str, cluster_factory: ClusterFactory,
                                     tmp_pg_dir: Path) -> None:
    pg = local.cluster
    spc = tmp_pg_dir / "spc"
    spc.mkdir()
    chown_pg(spc)
    pg.sql(f"create tablespace ts location '{spc}'")
    pg.sql("create table static (id int, v text) with (autovacuum_enabled = off)")
    pg.sql("insert into static select g, repeat(md5(g::text), 4) from generate_series(1, 20000) g")
    pg.sql("create table in_ts (id int, v text) with (autovacuum_enabled = off) tablespace ts")
    pg.sql("insert into in_ts select g, md5(g::text) from generate_series(1, 5000) g")
    pg.sql("create unlogged table scratch as select g from generate_series(1, 1000) g")
    pg.sql("create table load (id int, v text)")
    pg.sql("vacuum freeze static, in_ts")  # hint bits set now, so their files stay as they are
    pg.sql("checkpoint")
    static_file = pg.data / pg.scalar("select pg_relation_filepath('static')")
    ts_rel = pg.scalar("select pg_relation_filepath('in_ts')")
    scratch_rel = pg.scalar("select pg_relation_filepath('scratch')")
    static_md5, in_ts_md5 = pg.table_md5("static"), pg.table_md5("in_ts")
    before = list_files(pg.data)

    with pg.connect() as temp_session, Writer(pg) as writer:
        temp_session.execute("create temp table tmp_rows as select g from generate_series(1, 1000) g")
        temp_rel = temp_session.execute("select pg_relation_filepath('tmp_rows')").fetchone()[0]  # type: ignore[index]
        time.sleep(0.3)
        bid, r = local.backup("--jobs", "2")
    assert writer.rows > 0
    assert re.fullmatch(r"\d{8}T\d{6}F(-\d+)?", bid), r.stdout

    m = read_manifest(local.storage, bid)
    files = {f.path: f for f in m.files}
    # files that cannot change under us are copied byte for byte, including the tablespace's
    assert m.format == BLAKE3_MANIFEST_FORMAT  # an older pitr refuses it ("upgrade pitr") rather than misread it
    assert files[str(static_file.relative_to(pg.data))].blake3 == sha(static_file)
    assert files[str(static_file.relative_to(pg.data))].size == static_file.stat().st_size > 8192 * 10
    assert files[ts_rel].blake3 == sha(pg.data / ts_rel)
    assert [(t.oid, t.location) for t in m.tablespaces] == [(ts_rel.split("/")[1], str(spc))]
    assert m.tablespace_map and str(spc) in m.tablespace_map
    assert files["PG_VERSION"].mode == 0o600 and files["PG_VERSION"].blake3 == sha(pg.data / "PG_VERSION")
    # every file that existed before the backup and still exists is in it, except what PostgreSQL skips
    skip_top = {"postmaster.pid", "postmaster.opts", "current_logfiles"}
    expected = set()
    for rel in before & list_files(pg.data):
        top = rel.split("/")[0]
        if rel in skip_top or top in SKIPPED_DIRS or "pg_internal.init" in rel:
            continue
        if rel.startswith(scratch_rel) and not rel.startswith(scratch_rel + "_init"):
            continue  # an unlogged table's data: restarted empty from its init fork
        expected.add(rel)
    assert expected - set(files) == set()
    assert scratch_rel + "_init" in files and scratch_rel not in files
    assert not any(p.startswith(temp_rel) for p in files), "a temporary table was copied"
    # the skipped directories are there, empty
    dirs = {d.path for d in m.directories}
    assert set(SKIPPED_DIRS) <= dirs
    assert not [p for p in files if p.split("/")[0] in SKIPPED_DIRS]
    assert "backup_label" not in files and m.backup_label.startswith("START WAL LOCATION")
    assert m.bytes == sum(f.size for f in m.files) and 0 < m.stored_bytes < m.bytes

    # listed by info, restorable, with a sensible RPO
    doc = local.info()
    [b] = doc["backups"]
    assert (b["id"], b["status"], b["start_lsn"], b["stop_lsn"]) == (bid, "ok", m.start_lsn, m.stop_lsn)
    assert doc["recoverable"]["earliest_backup"] == bid
    assert 0 <= doc["rpo_seconds"] < 120
    assert doc["wal"]["timelines"][0]["gaps"] == []

    if pg_version != "15":
        return
    # PostgreSQL itself starts from the manifest's files and replays the archive to the final state
    pg.sql("insert into static select g, 'after the backup' from generate_series(1, 10) g")
    load_md5 = pg.table_md5("load")
    static_after = pg.table_md5("static")
    pg.wait_archived(pg.switch_wal())
    restored = cluster_factory("restored")
    spc2 = tmp_pg_dir / "spc2"
    reconstruct(local, m, restored, {m.tablespaces[0].oid: spc2})
    restored.start(env=local.env)
    wait_promoted(restored)
    assert restored.table_md5("static") == static_after != static_md5
    assert restored.table_md5("in_ts") == in_ts_md5
    assert restored.table_md5("load") == load_md5
    assert restored.scalar("select count(*) from scratch") == 0  # unlogged: empty after recovery
    assert os.readlink(restored.data / "pg_tblspc" / m.tablespaces[0].oid) == str(spc2)


@only_pg("18")
def test_backup_to_s3_streams_large_files_in_parts(cluster_factory: ClusterFactory, tmp_pg_dir: Path,
                                                     pitr_exe: Path, pg_version: str, moto_server: MotoServer,
                                                     s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = f"c-{uuid.uuid4().hex[:8]}"
    env = moto_server.env() | {"PITR_REPO": f"s3://{s3_bucket}/{prefix}", "PITR_S3_PART_SIZE_MB": "5"}
    for k, v in moto_server.env().items():
        monkeypatch.setenv(k, v)
    storage = S3Storage(s3_bucket, prefix, endpoint=moto_server.endpoint)
    s = start(cluster_factory(), storage, env, pitr_exe, tmp_pg_dir)
    s.cluster.pgbench(["-i", "-s", "1", "-q"])
    s.cluster.sql("checkpoint")
    accounts = s.cluster.scalar("select pg_relation_filepath('pgbench_accounts')")
    bid, _ = s.backup("--jobs", "2", "--compress", "none")
    m = read_manifest(storage, bid)
    entry = next(f for f in m.files if f.path == accounts)
    assert entry.size > 12 << 20 and entry.offset == 0  # big enough for parts; alone in its object
    head = moto_server.client().head_object(Bucket=s3_bucket, Key=f"{prefix}/{backup_dir(bid)}{entry.object}")
    assert re.search(r"-\d+\"?$", head["ETag"]), "expected a multipart upload"
    assert decode_file(storage, m, accounts) == (s.cluster.data / accounts).read_bytes()
    small = [f for f in m.files if f.object and f.size < 65536]
    assert len({f.object for f in small}) < len(small) / 50  # small files share bundle objects
    for f in small[:: max(1, len(small) // 20)]:
        data = decode_file(storage, m, f.path)
        assert len(data) == f.size and blake3.blake3(data).hexdigest() == f.blake3
    assert [b["id"] for b in s.info()["backups"]] == [bid]


# --------------------------------------------------------------------------- failures

@only_pg("15")
def test_backup_whose_wal_cannot_be_archived_fails_and_is_not_listed(
        cluster_factory: ClusterFactory, tmp_pg_dir: Path, pitr_exe: Path, pg_version: str) -> None:
    repo = tmp_pg_dir / "repo"
    repo.mkdir()
    chown_pg(repo)
    s = start(cluster_factory(), FsStorage(repo), {"PITR_REPO": str(repo)}, pitr_exe, tmp_pg_dir,
              archive_command="/bin/false")
    t0 = time.monotonic()
    r = s.pitr("backup", "--archive-timeout", "3")
    assert r.returncode == 1, r.stdout + r.stderr
    assert time.monotonic() - t0 < 30
    err = r.stderr
    assert re.search(r"WAL segment [0-9A-F]{24} needed by backup \S+ did not reach the archive within 3s", err), err
    assert "archive_command" in err and "pitr check" in err and "Traceback" not in err
    assert "archiver last failed on" in err  # PostgreSQL's own view of why
    assert r.stdout == ""
    assert list_backup_ids(s.storage) == []
    assert [o.key for o in s.storage.list("backups/")] == []  # the partial backup was removed
    assert s.info()["backups"] == []


@only_pg("15")
def test_interrupted_backup_is_not_listed(local: Setup, pg_version: str) -> None:
    pg = local.cluster
    pg.pgbench(["-i", "-s", "2", "-q"])
    repo = local.storage
    assert isinstance(repo, FsStorage)

    def interrupted(sig: int) -> subprocess.CompletedProcess[str]:
        # slow on purpose (one job, heavy compression) so there is a moment to interrupt it in
        argv = as_pg_argv([local.pitr_exe, "backup", "--jobs", "1", "--compress", "zstd:19"])
        p = subprocess.Popen(argv, env=pg_env(pg.env() | local.env), cwd="/tmp", text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not any(True for _ in (repo.root / "backups").glob("*/data/*")):
            assert p.poll() is None and time.monotonic() < deadline, "backup ended before it could be killed"
            time.sleep(0.05)
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
        return subprocess.CompletedProcess(argv, p.returncode, out, err)

    r = interrupted(signal.SIGTERM)
    assert r.returncode == 130, r.stderr
    assert "interrupted" in r.stderr and "nothing was listed" in r.stderr and "Traceback" not in r.stderr
    assert list_backup_ids(repo) == []
    assert not list(repo.list("backups/")), "SIGTERM: the partial backup's objects were removed"

    r = interrupted(signal.SIGKILL)
    assert r.returncode == -signal.SIGKILL
    assert list_backup_ids(repo) == []  # objects may remain, but nothing is listed

    # the server is not left in backup mode: the backup sessions are gone and were aborted
    deadline = time.monotonic() + 20
    while pg.scalar("select count(*) from pg_stat_activity where application_name = 'pitr backup'"):
        assert time.monotonic() < deadline, "a backup session is still open on the server"
        time.sleep(0.1)
    # the exiting backend's warning can reach the log file a moment after the session is gone
    aborted = "aborting backup due to backend exiting before pg_backup_stop was called"
    while pg.log_text().count(aborted) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pg.log_text().count(aborted) == 2
    bid, _ = local.backup("--compress", "zstd:1")
    assert list_backup_ids(repo) == [bid] and [b["id"] for b in local.info()["backups"]] == [bid]


@only_pg("18")
def test_damaged_page_is_reported_and_the_backup_still_completes(local: Setup, pg_version: str) -> None:
    pg = local.cluster
    assert pg.scalar("show data_checksums") == "on"
    pg.sql("create table victim (id int, v text) with (autovacuum_enabled = off)")
    pg.sql("insert into victim select g, md5(g::text) from generate_series(1, 5000) g")
    pg.sql("checkpoint")
    rel = pg.scalar("select pg_relation_filepath('victim')")
    pg.stop()
    path = pg.data / rel
    data = bytearray(path.read_bytes())
    assert len(data) >= 3 * 8192
    data[2 * 8192 + 6000] ^= 0x55  # inside a tuple of block 2: only the checksum can tell
    path.write_bytes(bytes(data))
    pg.start()

    r = local.pitr("backup", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["bad_pages"] == {rel: [2]} and doc["bad_pages_total"] == 1
    assert "1 page(s) in 1 file(s) failed their PostgreSQL checksum" in r.stderr
    assert f"{rel}: block(s) 2" in r.stderr
    m = read_manifest(local.storage, doc["id"])
    assert next(f for f in m.files if f.path == rel).bad_pages == [2]
    assert sum(len(f.bad_pages) for f in m.files) == 1  # nothing else was flagged under load-free reads
    assert local.info()["backups"][0]["bad_pages"] == 1


# --------------------------------------------------------------------------- restore points

@only_pg("15")
def test_restore_point_is_archived_when_the_command_returns(local: Setup, pg_version: str,
                                                            tmp_pg_dir: Path) -> None:
    r = local.pitr("restore-point", "before-release-42", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["name"] == "before-release-42" and doc["archived"] is True
    assert local.storage.stat(wal_key(doc["wal"])) is not None  # no waiting on our side
    # the record is really in that archived segment: fetch it back and let pg_waldump read it
    dest = tmp_pg_dir / doc["wal"]  # pg_waldump reads the segment number from the name
    r2 = local.pitr("wal-fetch", doc["wal"], str(dest))
    assert r2.returncode == 0, r2.stderr
    dump = local.cluster.run("pg_waldump", str(dest), check=False)
    assert "desc: RESTORE_POINT before-release-42" in dump.stdout, dump.stdout[-3000:]
    r3 = local.pitr("restore-point", "quick", "--no-wait")
    assert r3.returncode == 0 and re.fullmatch(r"[0-9A-F]+/[0-9A-F]+", r3.stdout.strip().splitlines()[-1])
    r4 = local.pitr("restore-point", "x" * 64)
    assert r4.returncode == 2 and "1 to 63 bytes" in r4.stderr
    # the repository remembers both points (restore --target-name picks its backup by them)
    info = json.loads(local.pitr("info", "--json").stdout)
    points = {p["name"]: p for p in info["restore_points"]}
    assert set(points) >= {"before-release-42", "quick"}
    assert points["before-release-42"]["lsn"] == doc["lsn"] and points["before-release-42"]["timeline"] == 1
    assert "before-release-42" in local.pitr("info").stdout


@only_pg("15")
def test_refuses_foreign_or_uninitialized_repositories_and_incremental(local: Setup, pg_version: str,
                                                                 cluster_factory: ClusterFactory) -> None:
    other = cluster_factory("other").initdb()
    other.start()
    r = run_as_postgres([local.pitr_exe, "backup"], env=other.env() | local.env, cwd="/tmp", check=False)
    assert r.returncode == 1 and "belongs to the cluster with system identifier" in r.stderr
    assert list_backup_ids(local.storage) == []
    r = local.pitr("backup", "--pgdata", str(other.data))  # the server is ours, the directory is not
    assert r.returncode == 1 and "belongs to another cluster than the server" in r.stderr, r.stderr
    r = local.pitr("backup", "--type", "weekly")
    assert r.returncode == 2 and "unknown backup type 'weekly'" in r.stderr and "full, diff or incr" in r.stderr
    empty = local.base / "empty"
    empty.mkdir()
    chown_pg(empty)
    r = local.pitr("backup", env={"PITR_REPO": str(empty)})
    assert r.returncode == 1 and "is not initialized" in r.stderr and "pitr init" in r.stderr



# --------------------------------------------------------------------------- the copy pipeline alone

def valid_pages(n: int, first_blkno: int = 0, seed: int = 1) -> bytearray:
    """n pages with plausible headers and correct checksums, as PostgreSQL would write them."""
    rng = random.Random(seed)
    out = bytearray()
    for i in range(n):
        page = bytearray(rng.randbytes(8192))
        # pd_lsn (2 words), pd_checksum (set below), pd_flags, pd_lower, pd_upper, pd_special
        struct.pack_into("<IIHHHHH", page, 0, 0, 0x1000 + i, 0, 0, 64, 4000, 8192)
        out += page
    sums = pagecheck.page_checksums(bytes(out), np.arange(first_blkno, first_blkno + n, dtype=np.uint64))
    for i, c in enumerate(sums):
        struct.pack_into("<H", out, i * 8192 + 8, int(c))
    return out


def test_pipeline_bundles_streams_checks_pages_and_tolerates_changing_files(tmp_path: Path) -> None:
    pages = valid_pages(12)
    big, small = bytearray(pages), bytearray(pages[:3 * 8192])
    big[7 * 8192 + 3000] ^= 1
    small[1 * 8192 + 100] ^= 1
    files = {"base/5/100": bytes(big), "base/5/101": bytes(small), "base/5/102": b"",
             "PG_VERSION": b"15\n", "grows": b"g" * 5000, "shrinks": b"s" * 5000, "vanishes": b"v" * 10}
    files |= {f"base/5/{200 + i}": bytes([i]) * (3000 + i) for i in range(40)}
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    src = [SourceFile(rel, str(tmp_path / rel), len(data), rel.startswith("base/5/") and rel < "base/5/2")
           for rel, data in sorted(files.items())]
    (tmp_path / "grows").write_bytes(b"g" * 9000)  # grew after the scan: copied up to the scanned size
    (tmp_path / "shrinks").write_bytes(b"s" * 100)
    (tmp_path / "vanishes").unlink()
    storage = MemoryStorage()
    done: list[int] = []
    pipe = Pipeline(storage, StoreOptions("B", envelope.Codec("zstd", 3), jobs=3, start_lsn=1 << 40,
                                          bundle_size=32 << 10, large_file=64 << 10),
                    sum(f.size for f in src), lambda d, t: done.append(d))
    pipe.run(src)
    res = pipe.result
    got = {e.path: e for e in res.entries}
    assert set(got) == set(files) - {"vanishes"} and res.vanished == ["vanishes"]
    assert got["grows"].size == 5000 and got["shrinks"].size == 100 and got["base/5/102"].object is None
    assert got["base/5/100"].bad_pages == [7] and got["base/5/101"].bad_pages == [1]  # streamed and bundled
    assert not any(e.bad_pages for p, e in got.items() if p not in ("base/5/100", "base/5/101"))
    assert got["base/5/100"].offset == 0 and got["base/5/100"].object != got["base/5/101"].object
    objects = {k for k in storage.objects if k.startswith("backups/B/data/")}
    assert len(objects) == res.objects < len(files) / 4  # small files share bundles
    for e in got.values():  # every entry decodes from its object range to the bytes read
        if e.object:
            body = storage.get_range(f"backups/B/{e.object}", e.offset, e.length)
            want = (tmp_path / e.path).read_bytes()[: e.size]
            assert envelope.decode(body) == want and blake3.blake3(want).hexdigest() == e.blake3 and not e.sha256
            assert body[4] == envelope.VERSION == 2
    assert res.raw_bytes == sum(e.size for e in got.values()) and done[-1] == res.raw_bytes
    assert res.stored_bytes == sum(len(storage.objects[k][0]) for k in objects)


class FailingStorage(MemoryStorage):
    def __init__(self, fail_on: int) -> None:
        super().__init__()
        self.puts = 0
        self.fail_on = fail_on

    def put(self, key: str, data: bytes | BinaryIO, *, if_absent: bool = False) -> None:
        self.puts += 1
        if self.puts == self.fail_on:
            raise StorageError("the disk is full")
        super().put(key, data, if_absent=if_absent)


def test_pipeline_stops_on_the_first_failure_and_on_abort(tmp_path: Path) -> None:
    src = []
    for i in range(30):
        p = tmp_path / f"f{i}"
        p.write_bytes(os.urandom(20000))
        src.append(SourceFile(p.name, str(p), 20000, False))
    opts = StoreOptions("B", envelope.Codec("zstd", 1), jobs=2, bundle_size=40000, large_file=1 << 20)
    with pytest.raises(StorageError, match="the disk is full"):
        Pipeline(FailingStorage(3), opts).run(src)
    abort = threading.Event()
    abort.set()
    t0 = time.monotonic()
    with pytest.raises(Exception) as err:
        Pipeline(MemoryStorage(), opts, abort=abort).run(src)
    assert is_internal_abort(err.value) and time.monotonic() - t0 < 5


def test_backup_ids_sort_by_time_and_stay_unique() -> None:
    now = dt.datetime(2026, 11, 25, 22, 15, 30, tzinfo=dt.UTC)
    taken = {"20261125T221530F", "20261125T221530F-2"}
    assert new_backup_id(now, lambda b: False) == "20261125T221530F"
    bid = new_backup_id(now, lambda b: b in taken)
    assert bid == "20261125T221530F-3"
    assert sorted(["20261125T221529F", bid, "20261125T221531F"])[1] == bid
