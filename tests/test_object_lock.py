"""S3 Object Lock (`pitr init --lock-days N`), on a moto server: every object pitr writes afterwards
carries a retention of at least N days, an attacker holding the host's credentials cannot delete a
locked version, and expire leaves locked versions in place, says until when, and exits 0.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from pitr.storage.s3 import S3Storage
from tests.support.pg import PgCluster, make_tmpdir, rmtree_pg, run_as_postgres
from tests.support.s3 import MotoServer


def lock_bucket(moto: MotoServer) -> str:
    name = f"lock-{uuid.uuid4().hex[:12]}"
    moto.client().create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    return name


def test_puts_carry_retention_and_locked_versions_survive(moto_env: MotoServer) -> None:
    bucket = lock_bucket(moto_env)
    st = S3Storage(bucket, "r", endpoint=moto_env.endpoint, part_size=5 << 20)
    st.retention = ("GOVERNANCE", 3)
    st.put("small", b"x" * 100)
    st.put("big", b"y" * (11 << 20))  # multipart
    c = moto_env.client()
    for key in ("r/small", "r/big"):
        h = c.head_object(Bucket=bucket, Key=key)
        assert h.get("ObjectLockMode") == "GOVERNANCE", (key, h)
        assert h["ObjectLockRetainUntilDate"] >= datetime.now(UTC) + timedelta(days=3), h
    vid = c.head_object(Bucket=bucket, Key="r/small")["VersionId"]
    with pytest.raises(ClientError, match="AccessDenied"):  # the attacker, without bypass
        c.delete_object(Bucket=bucket, Key="r/small", VersionId=vid)
    st.delete_many(["small"])  # by version: nothing freed while locked, nothing raised
    assert [k for k, _ in st.locked_left] == ["small"]
    assert st.locked_left[0][1] >= datetime.now(UTC) + timedelta(days=3)
    assert c.head_object(Bucket=bucket, Key="r/small", VersionId=vid)["ContentLength"] == 100


def pitr(exe: Path, env: dict[str, str], *args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_as_postgres([exe, *map(str, args)], env=env, cwd="/tmp", check=False, timeout=timeout)


def ok(p: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


@pytest.mark.pg
def test_init_lock_days_end_to_end(moto_env: MotoServer, pg_bindir: Path, pitr_exe: Path) -> None:
    base = make_tmpdir("pitr-lock-")
    src = PgCluster(pg_bindir, base / "src", name="lock-src")
    try:
        plain = moto_env.create_bucket(f"nolock-{uuid.uuid4().hex[:12]}")
        bucket = lock_bucket(moto_env)
        env = {"PITR_REPO": f"s3://{bucket}/r"} | moto_env.env()
        src.initdb(f"archive_mode = on\narchive_command = '{pitr_exe} wal-push %p'\n")
        src.start(env=env)
        c = moto_env.client()

        # refusals: a bucket without Object Lock, a directory, a bad mode; nothing written
        p = pitr(pitr_exe, env | {"PITR_REPO": f"s3://{plain}/r"}, "init", "--lock-days", "7", "--dbname", src.conninfo)
        assert p.returncode == 2 and "does not have Object Lock enabled" in p.stderr, p.stderr
        assert "object-lock-enabled-for-bucket" in p.stderr
        assert c.list_objects_v2(Bucket=plain).get("KeyCount", 0) == 0
        p = pitr(pitr_exe, env | {"PITR_REPO": str(base / "dir")}, "init", "--lock-days", "7",
                 "--dbname", src.conninfo)
        assert p.returncode == 2 and "needs an S3 repository" in p.stderr, p.stderr
        p = pitr(pitr_exe, env, "init", "--lock-days", "7", "--lock-mode", "forever", "--dbname", src.conninfo)
        assert p.returncode == 2 and "--lock-mode" in p.stderr, p.stderr

        out = ok(pitr(pitr_exe, env, "init", "--lock-days", "2", "--dbname", src.conninfo)).stdout
        assert "Object Lock: governance, 2 days" in out
        meta = json.loads(c.get_object(Bucket=bucket, Key="r/pitr.json")["Body"].read())
        assert meta["lock_days"] == 2 and meta["lock_mode"] == "governance"
        src.sql("create table t as select g from generate_series(1, 1000) g")
        ok(pitr(pitr_exe, env, "backup", "--dbname", src.conninfo, "--pgdata", src.data))
        ok(pitr(pitr_exe, env, "backup", "--dbname", src.conninfo, "--pgdata", src.data))
        src.wait_archived(src.switch_wal())
        keys = [o["Key"] for o in c.list_objects_v2(Bucket=bucket, Prefix="r/")["Contents"]]
        assert any("/wal/" in "/" + k for k in keys) and any(k.startswith("r/backups/") for k in keys)
        for key in keys:
            if key == "r/pitr.json":
                continue
            h = c.head_object(Bucket=bucket, Key=key)
            assert h.get("ObjectLockMode") == "GOVERNANCE", key
            assert h["ObjectLockRetainUntilDate"] >= datetime.now(UTC) + timedelta(days=2), key
        info = ok(pitr(pitr_exe, env, "info")).stdout
        assert "Object Lock  on (governance, 2 days)" in info, info
        assert json.loads(ok(pitr(pitr_exe, env, "info", "--json")).stdout)["object_lock"] == {
            "enabled": True, "mode": "governance", "days": 2}

        # check --storage tests the lock; its probes are never locked
        out = pitr(pitr_exe, env, "check", "--storage").stdout  # moto does not verify checksums: that point fails
        lock_lines = [ln for ln in out.splitlines() if "object-lock" in ln]
        assert lock_lines and lock_lines[0].startswith("ok") and "governance retention of 2 days" in out, out
        for v in c.list_object_versions(Bucket=bucket, Prefix="r/.pitr-check/").get("Versions", []):
            h = c.head_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])
            assert "ObjectLockMode" not in h, v["Key"]  # a probe version is never locked (it can be removed)

        # the attacker cannot delete a locked version
        k = next(k for k in keys if k.startswith("r/backups/"))
        vid = c.head_object(Bucket=bucket, Key=k)["VersionId"]
        with pytest.raises(ClientError, match="AccessDenied"):
            c.delete_object(Bucket=bucket, Key=k, VersionId=vid)

        # expire: the older backup's objects are locked; left, reported with a date, exit 0
        p = ok(pitr(pitr_exe, env, "expire", "--retain-full", "1"))
        assert "still under Object Lock" in p.stdout and "unlocks" in p.stdout, p.stdout
        ok(pitr(pitr_exe, env, "verify"))
    finally:
        src.ensure_stopped()
        rmtree_pg(base)


def test_encrypted_repository_keeps_the_policy_in_the_plain_part(moto_env: MotoServer) -> None:
    from pitr.ops.admin.init import init_repo
    from pitr.ops.admin.lock import record_lock
    from pitr.pg.conn import ServerInfo
    from pitr.repo.keys import passphrase_source
    from pitr.repo.meta import read_meta
    from pitr.repo.sealed import RepoStorage

    bucket = lock_bucket(moto_env)
    key = passphrase_source("a passphrase", "PITR_ENCRYPTION_PASSPHRASE")
    server = ServerInfo(150000, 7301234567890123456, 16 << 20, "/nowhere", False)
    first = RepoStorage(S3Storage(bucket, "e", endpoint=moto_env.endpoint), key)
    init_repo(first, server, encrypt=True)
    assert record_lock(first, 5, "compliance")
    assert not record_lock(first, 5, "compliance")  # recorded once
    raw = json.loads(moto_env.client().get_object(Bucket=bucket, Key="e/pitr.json")["Body"].read())
    assert raw["lock_days"] == 5 and raw["lock_mode"] == "compliance" and "encryption" in raw
    # a later process: the policy is read before any write, the key still opens the repository
    later = RepoStorage(S3Storage(bucket, "e", endpoint=moto_env.endpoint), key)
    assert read_meta(later).system_identifier == 7301234567890123456
    later.put("wal/x", b"sealed and locked")
    h = moto_env.client().head_object(Bucket=bucket, Key="e/wal/x")
    assert h.get("ObjectLockMode") == "COMPLIANCE"
    assert h["ObjectLockRetainUntilDate"] >= datetime.now(UTC) + timedelta(days=5)
    assert later.get("wal/x") == b"sealed and locked"
