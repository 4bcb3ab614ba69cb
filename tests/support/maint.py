"""Test helpers for verify/check/expire: a real cluster archiving through `pitr wal-push` into a
repository, backups through `pitr backup`, and ways to damage or fingerprint stored objects."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pitr.pg import walname
from pitr.repo.format import META_KEY, wal_key
from pitr.repo.manifest import Manifest, read_manifest, write_manifest
from pitr.repo.meta import new_meta
from pitr.storage.base import Storage
from pitr.storage.fs import FsStorage
from pitr.storage.s3 import S3Storage
from tests.support.pg import PgCluster, chown_pg, pg_bin_dirs, run_as_postgres
from tests.support.s3 import MotoServer

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


def new_repo(kind: str, base: Path, moto: MotoServer | None, prefix: str = "prod") -> tuple[dict[str, str], Storage]:
    """A repository of `kind` for one test set-up: "fs" is base/repo (`pitr init` creates it), "s3" a fresh
    bucket on moto holding it under `prefix`. Returns how pitr reaches it (env) and the store to inspect it."""
    if kind == "fs":
        return {"PITR_REPO": f"file://{base / 'repo'}"}, FsStorage(base / "repo")
    assert moto is not None, "an S3 repository needs the moto server"
    bucket = moto.create_bucket(f"repo-{uuid.uuid4().hex[:16]}")
    return {"PITR_REPO": f"s3://{bucket}/{prefix}"} | moto.env(), S3Storage(bucket, prefix, endpoint=moto.endpoint)


def start_source(cluster: PgCluster, env: Mapping[str, str], pitr_exe: Path, extra_conf: str = "") -> PgCluster:
    """initdb `cluster` archiving through `pitr wal-push` (+ extra_conf), start it with `env` (the repository)
    and `pitr init` that repository; the cluster is stopped again if a step fails."""
    cluster.initdb(f"archive_mode = on\narchive_command = '{pitr_exe} wal-push %p'\n" + extra_conf)
    try:
        cluster.start(env=env)
        r = run_as_postgres([pitr_exe, "init", "--dbname", cluster.conninfo], env=env, cwd="/tmp", check=False)
        assert r.returncode == 0, f"pitr init exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    except BaseException:
        cluster.ensure_stopped()
        raise
    return cluster


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


def fs_repo(root: Path, manifests: Iterable[Manifest], wal_segments: int, seg_size: int = 16 << 20) -> FsStorage:
    """A directory repository at root without PostgreSQL (expire's CLI tests): its meta (system 1,
    PostgreSQL 15), timeline 1's segments 1..wal_segments with dummy contents, and the manifests."""
    fs = FsStorage(root)
    fs.create()
    fs.put(META_KEY, new_meta(1, 15, seg_size).to_json())
    for n in range(1, wal_segments + 1):
        fs.put(wal_key(walname.seg_name(1, n, seg_size)), b"x")
    for m in manifests:
        write_manifest(fs, m)
    return fs


def pitr_cli(fs: FsStorage, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """This venv's `pitr args...` on the directory repository fs, with no configuration file."""
    env = {"PATH": os.environ["PATH"], "HOME": "/tmp", "PITR_CONFIG": "/dev/null", "PITR_REPO": str(fs.root)}
    return subprocess.run([str(Path(sys.executable).parent / "pitr"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
