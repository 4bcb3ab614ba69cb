"""`--repo-as-of TS`: reading a versioned S3 repository as it was, after an attacker with the host's
credentials deleted every object and overwrote the metadata (moto server; the restore on PostgreSQL 18).

The view (storage/s3_asof.py) reads each key's newest version written at or before TS, ignores
delete markers and later versions, and refuses writes; a directory repository and a bucket without
versioning are refused with exit 2. `verify` names a write-once object whose current version is not
the one pitr wrote.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pitr.errors import ConfigError, NotFoundError, UsageError
from pitr.storage.s3 import S3Storage
from pitr.storage.s3_asof import S3AsOfStorage
from tests.support.pg import PgCluster, make_tmpdir, pg_bin_dirs, rmtree_pg, run_as_postgres
from tests.support.s3 import MotoServer


def versioned_bucket(moto: MotoServer) -> str:
    bucket = moto.create_bucket(f"asof-{uuid.uuid4().hex[:12]}")
    moto.client().put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    return bucket


def attack(moto: MotoServer, bucket: str) -> None:
    """What the host's credentials allow: delete every object (delete markers) and overwrite pitr.json."""
    c = moto.client()
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            c.delete_object(Bucket=bucket, Key=o["Key"])
    c.put_object(Bucket=bucket, Key="r/pitr.json", Body=b"\x00ransom: pay 10 BTC")


def now_between_writes() -> datetime:
    """A moment strictly after what was written and before what comes next (LastModified has 1 s steps)."""
    time.sleep(1.2)
    t = datetime.now(UTC)
    time.sleep(1.2)
    return t


def test_view_reads_the_past_and_refuses_writes(moto_env: MotoServer) -> None:
    bucket = versioned_bucket(moto_env)
    live = S3Storage(bucket, "r", endpoint=moto_env.endpoint)
    live.put("a", b"first a")
    live.put("big", bytes(range(256)) * 100)
    t = now_between_writes()
    live.put("a", b"second a")
    live.delete("big")
    live.put("new", b"after")
    view = S3AsOfStorage(S3Storage(bucket, "r", endpoint=moto_env.endpoint), t)
    assert [o.key for o in view.list()] == ["a", "big"]
    assert view.get("a") == b"first a"
    assert view.get_range("big", 256, 4) == bytes(range(4))
    assert view.get_range("big", -3) == bytes([253, 254, 255])
    assert view.stat("new") is None and view.stat("big").size == 25600  # type: ignore[union-attr]
    with pytest.raises(NotFoundError):
        view.get("new")
    with pytest.raises(UsageError, match="read-only"):
        view.put("x", b"y")
    with pytest.raises(UsageError, match="read-only"):
        view.delete("a")
    assert live.get("a") == b"second a"


def test_unversioned_bucket_refused(moto_env: MotoServer) -> None:
    bucket = moto_env.create_bucket(f"plain-{uuid.uuid4().hex[:12]}")
    view = S3AsOfStorage(S3Storage(bucket, "r", endpoint=moto_env.endpoint), datetime.now(UTC))
    with pytest.raises(ConfigError, match="versioning was never enabled"):
        list(view.list())


def pitr(exe: Path, env: dict[str, str], *args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_as_postgres([exe, *map(str, args)], env=env, cwd="/tmp", check=False, timeout=timeout)


def ok(p: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def test_refusals_on_the_command_line(moto_server: MotoServer, pitr_exe: Path, tmp_path: Path) -> None:
    p = pitr(pitr_exe, {"PITR_REPO": "/tmp/pitr-asof-nowhere"}, "info", "--repo-as-of", "2026-01-01 00:00 UTC")
    assert p.returncode == 2 and "is a directory, which keeps none" in p.stderr, p.stderr
    bucket = moto_server.create_bucket(f"plain-{uuid.uuid4().hex[:12]}")
    env = {"PITR_REPO": f"s3://{bucket}/r"} | moto_server.env()
    p = pitr(pitr_exe, env, "verify", "--repo-as-of", "2026-01-01 00:00 UTC")
    assert p.returncode == 2 and "versioning was never enabled" in p.stderr, p.stderr
    p = pitr(pitr_exe, env, "info", "--repo-as-of", "03/04/2026 10:00")
    assert p.returncode == 2 and "--repo-as-of" in p.stderr and "more than one way" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.pg
def test_restore_after_ransomware(moto_env: MotoServer, pg_bindir: Path, pitr_exe: Path, pg_version: str) -> None:
    if pg_version != "18" and "18" in pg_bin_dirs():
        pytest.skip("checked on PostgreSQL 18 only (reading the bucket as it was does not depend on the server "
                    "version; S3 restores on 15 are in test_restore_pg)")
    base = make_tmpdir("pitr-asof-")
    src = PgCluster(pg_bindir, base / "src", name="asof-src")
    try:
        bucket = versioned_bucket(moto_env)
        env = {"PITR_REPO": f"s3://{bucket}/r"} | moto_env.env()
        src.initdb(f"archive_mode = on\narchive_command = '{pitr_exe} wal-push %p'\n")
        src.start(env=env)
        ok(pitr(pitr_exe, env, "init", "--dbname", src.conninfo))
        src.sql("create table t (id int primary key, v text)")
        src.sql("insert into t select g, md5(g::text) from generate_series(1, 5000) g")
        backup_id = ok(pitr(pitr_exe, env, "backup", "--dbname", src.conninfo, "--pgdata", src.data)).stdout
        backup_id = backup_id.strip().splitlines()[-1]
        src.sql("insert into t select g, 'after' from generate_series(5001, 6000) g")
        want = src.table_md5("t")
        src.wait_archived(src.switch_wal())
        src.stop()
        t = now_between_writes()
        ts = t.isoformat()
        # first the attacker overwrites one archived segment: verify names it as tampered (tamper evidence)
        c = moto_env.client()
        seg = sorted(o["Key"] for o in c.list_objects_v2(Bucket=bucket, Prefix="r/wal/")["Contents"])[0]
        c.put_object(Bucket=bucket, Key=seg, Body=b"encrypted by ransomware")
        p = pitr(pitr_exe, env, "verify")
        assert p.returncode == 1, p.stdout + p.stderr
        assert f"tampered: {seg[2:]}: has 2 versions" in p.stdout, p.stdout
        attack(moto_env, bucket)

        p = pitr(pitr_exe, env, "info")
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stdout + p.stderr
        out = ok(pitr(pitr_exe, env, "info", "--repo-as-of", ts, "--json")).stdout
        assert backup_id in [b["id"] for b in json.loads(out)["backups"]], out
        ok(pitr(pitr_exe, env, "verify", "--repo-as-of", ts))

        dest = PgCluster(pg_bindir, base / "r1", name="asof-r1")
        out = json.loads(ok(pitr(pitr_exe, env, "restore", "--pgdata", dest.data, "--repo-as-of", ts, "--json",
                                 "--replay", "--archive-mode", "off", "--replay-timeout", "240")).stdout)
        assert out["replay"]["reached"], out
        dest.append_conf()
        dest.start(env=env)
        assert dest.table_md5("t") == want
        dest.stop()

        # drill from the past: passes, and its record is printed, not written into the attacked bucket
        rec = json.loads(ok(pitr(pitr_exe, env, "drill", "--repo-as-of", ts, "--json", "--no-amcheck",
                                 "--check", "select count(*) = 6000 from t", "--replay-timeout", "240")).stdout)
        assert rec["passed"] and rec["stored"] is None and rec["repo_as_of"], rec
        assert not c.list_objects_v2(Bucket=bucket, Prefix="r/drills/").get("Contents")
    finally:
        src.ensure_stopped()
        rmtree_pg(base)
