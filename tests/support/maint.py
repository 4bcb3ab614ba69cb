"""Test helpers for verify/check/expire: a real cluster archiving through `pitr wal-push` into a
repository, backups through `pitr backup`, and ways to damage or fingerprint stored objects."""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pitr.pg import walname
from pitr.repo.manifest import Manifest, read_manifest
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


def backup(repo: Repo) -> Manifest:
    """`pitr backup` of the running cluster; its manifest."""
    r = repo.pitr("backup")
    assert r.returncode == 0, r.stdout + r.stderr
    return read_manifest(repo.storage, r.stdout.splitlines()[-1].strip())


def data_keys(storage: Storage, m: Manifest) -> list[str]:
    """The backup's data objects, largest first."""
    objs = [o for o in storage.list(f"backups/{m.id}/data/")]
    return [o.key for o in sorted(objs, key=lambda o: -o.size)]


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
