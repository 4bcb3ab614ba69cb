"""Test helpers for verify/check/expire: a real cluster archiving through `pitr wal-push`, and a
small synthetic base backup (real pg_backup_start/stop LSNs, real data-dir files, written with the
manifest and envelope code) for repositories built before `pitr backup` is used."""

from __future__ import annotations

import datetime
import hashlib
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pitr.pg import walname
from pitr.repo import codec as envelope
from pitr.repo.format import backup_data_key
from pitr.repo.manifest import FileEntry, Manifest, write_manifest
from pitr.repo.meta import read_meta
from pitr.storage.base import Storage
from tests.support.pg import PgCluster, chown_pg, pg_bin_dirs, run_as_postgres

ARCHIVE_CONF = "archive_mode = on\narchive_command = 'pitr wal-push %p'\n"


@dataclass
class Repo:
    """A running cluster archiving into `storage` (reached by pitr through `env`)."""

    cluster: PgCluster
    storage: Storage
    env: dict[str, str]  # PITR_REPO and, for S3, endpoint and credentials
    pitr_exe: Path
    fs_root: Path | None = None  # the repository directory, for fs repos

    def pitr(self, *args: str, env: dict[str, str] | None = None,
             timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """Run pitr as postgres with the repo and the cluster's libpq environment."""
        return run_as_postgres([self.pitr_exe, *args], env=self.cluster.env() | self.env | (env or {}),
                               cwd="/tmp", check=False, timeout=timeout)

    def churn(self, switches: int = 2) -> str:
        """Write a little and switch segments; wait until the last one is archived."""
        seg = ""
        for _ in range(switches):
            self.cluster.sql("insert into churn select g, md5(g::text) from generate_series(1, 200) g")
            seg = self.cluster.switch_wal()
        self.cluster.wait_archived(seg)
        return seg

    def segments(self) -> list[str]:
        names = [o.key.rsplit("/", 1)[1] for o in self.storage.list("wal/")]
        return sorted(n for n in names if (w := walname.parse(n)) and w.kind == "segment")

    def fix_owner(self) -> None:
        """Objects the test wrote as root go to postgres, which runs pitr."""
        if self.fs_root is not None:
            chown_pg(self.fs_root, recursive=True)


def start_repo(cluster: PgCluster, storage: Storage, env: dict[str, str], pitr_exe: Path,
               fs_root: Path | None = None, extra_conf: str = "") -> Repo:
    cluster.initdb(ARCHIVE_CONF + extra_conf).start(env=env)
    repo = Repo(cluster, storage, env, pitr_exe, fs_root)
    r = repo.pitr("init")
    assert r.returncode == 0, r.stderr
    cluster.sql("create table churn (id int, v text)")
    return repo


_seq = 0


def synthetic_backup(repo: Repo, stop_time: datetime.datetime | None = None, big_rows: int = 2000) -> Manifest:
    """A backup whose LSNs come from a real pg_backup_start/stop and whose files are a handful of
    real data-dir files: three small ones bundled in data/000000, a table's heap alone in
    data/000001, one empty file with no object."""
    global _seq
    _seq += 1
    pg = repo.cluster
    storage = repo.storage
    meta = read_meta(storage)
    pg.sql(f"create table if not exists big{_seq} as select g, md5(g::text) v from generate_series(1, {big_rows}) g")
    heap = str(pg.scalar(f"select pg_relation_filepath('big{_seq}')"))
    pg.sql("checkpoint")
    started = datetime.datetime.now(datetime.UTC)
    bid = started.strftime("%Y%m%dT%H%M%S") + f"{started.microsecond:06d}Z"
    with pg.connect() as conn:
        start_lsn = str(conn.execute("select pg_backup_start('pitr-test', true)").fetchone()[0])  # type: ignore[index]
        small = ["PG_VERSION", "global/pg_control", "postgresql.conf"]
        contents = {p: (pg.data / p).read_bytes() for p in [*small, heap]}
        row = conn.execute("select lsn::text, labelfile from pg_backup_stop(true)").fetchone()
        assert row is not None
        stop_lsn, label = str(row[0]), str(row[1])
    files: list[FileEntry] = []
    bundle = b""
    for p in small:
        env = envelope.encode(contents[p], envelope.Codec("zstd", 3))
        files.append(_entry(p, contents[p], "data/000000", len(bundle), len(env)))
        bundle += env
    storage.put(backup_data_key(bid, 0), bundle)
    env = envelope.encode(contents[heap], envelope.Codec("zstd", 3))
    files.append(_entry(heap, contents[heap], "data/000001", 0, len(env)))
    storage.put(backup_data_key(bid, 1), env)
    files.append(FileEntry("pg_logical/replorigin_checkpoint", 0, "", 0o600, time.time(), None))
    seg = meta.wal_segment_size
    tli = int(pg.scalar("select timeline_id from pg_control_checkpoint()"))
    stopped = stop_time or datetime.datetime.now(datetime.UTC)
    m = Manifest(
        id=bid, type="full", system_identifier=meta.system_identifier, pg_version=meta.pg_version,
        pg_version_num=int(pg.scalar("show server_version_num")), wal_segment_size=seg,
        timeline=tli, start_lsn=start_lsn, stop_lsn=stop_lsn,
        start_wal=walname.segment_of_lsn(tli, walname.parse_lsn(start_lsn), seg),
        stop_wal=walname.segment_of_lsn(tli, walname.parse_lsn(stop_lsn), seg),
        start_time=(stop_time or started).isoformat(), stop_time=stopped.isoformat(), compress="zstd:3",
        backup_label=label, tablespace_map=None, checksums_enabled=True, files=files, directories=[],
        bytes=sum(len(c) for c in contents.values()), stored_bytes=len(bundle) + len(env),
    )
    write_manifest(storage, m)
    repo.fix_owner()
    return m


def _entry(path: str, data: bytes, obj: str, offset: int, length: int) -> FileEntry:
    return FileEntry(path, len(data), hashlib.sha256(data).hexdigest(), 0o600, time.time(), obj, offset, length)


def flip_byte(storage: Storage, key: str, offset: int) -> None:
    """Corrupt one stored byte of an object (through the storage interface: works on fs and S3)."""
    data = bytearray(storage.get(key))
    data[offset] ^= 0x5A
    storage.put(key, bytes(data))


def snapshot(storage: Storage) -> dict[str, tuple[int, str]]:
    """key -> (size, sha256) of every object: to prove a command changed nothing."""
    return {o.key: (o.size, hashlib.sha256(storage.get(o.key)).hexdigest()) for o in storage.list("")}


def pg15_cluster(base: Path, name: str = "pg") -> PgCluster:
    """A PostgreSQL 15 cluster (most maintenance tests need one version only)."""
    return PgCluster(pg_bin_dirs()["15"], base / name, name=name)
