"""`pitr expire` removes what interrupted writes left behind (defect 11): `.tmp.*` files of a put()
killed before its rename, which list() hides, once untouched for an hour; a write in progress
(younger) is never touched. On S3 the same goes for incomplete multipart uploads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pitr.ops.admin.retention import TEMP_GRACE, Policy, apply, gather_and_plan
from pitr.repo.format import wal_key
from tests.support.walgen import fs_repo

PITR = Path(sys.executable).parent / "pitr"

KILLED_PUT = """
import sys, time
from pathlib import Path
from pitr.storage.fs import FsStorage

class Slow:
    def __init__(self): self.n = 0
    def read(self, size=-1):
        self.n += 1
        if self.n == 1:
            return b"x" * 4096
        print("writing", flush=True)
        time.sleep(600)
        return b""

FsStorage(Path(sys.argv[1])).put(sys.argv[2], Slow())
"""


def killed_put(root: Path, key: str) -> Path:
    """Run a put() in a child and kill -9 it mid-write: the temp file it leaves, as a crash would."""
    child = subprocess.Popen([sys.executable, "-c", KILLED_PUT, str(root), key], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "writing"
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    [tmp] = [p for p in (root / key).parent.iterdir() if p.name.startswith(".tmp.")]
    return tmp


def age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_stale_temp_files_are_removed_and_fresh_ones_kept(tmp_path: Path) -> None:
    repo = fs_repo(tmp_path / "repo")
    old = killed_put(repo.root, wal_key("000000010000000000000003"))
    fresh = killed_put(repo.root, "backups/20260101T000000F/data/000001")
    age(old, TEMP_GRACE + 60)
    assert not [o for o in repo.list() if ".tmp." in o.key]  # hidden from every listing
    p = gather_and_plan(repo, Policy(retain_full=1), time.time())
    assert [t.key for t in p.temps] == [str(old.relative_to(repo.root))] and not p.empty
    apply(repo, p)
    assert not old.exists() and fresh.exists()


def test_expire_cli_shows_and_removes_leftovers(tmp_path: Path) -> None:
    repo = fs_repo(tmp_path / "repo")
    old = killed_put(repo.root, wal_key("000000010000000000000003"))
    age(old, 2 * TEMP_GRACE)
    env = {"PATH": os.environ["PATH"], "HOME": "/tmp", "PITR_CONFIG": "/dev/null", "PITR_REPO": str(repo.root)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(PITR), "expire", "--retain-full", "1", *args], env=env, capture_output=True,
                              text=True, timeout=60)

    r = run("--dry-run")
    assert r.returncode == 0, r.stderr
    assert "1 leftover temporary object(s) of interrupted writes" in r.stdout and old.exists()
    r = run("--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["temps"]["keys"] == [str(old.relative_to(repo.root))] and out["deleted"]["temps"] == 1
    assert not old.exists()


def test_expire_aborts_abandoned_multipart_uploads_on_s3(moto_server, s3_bucket: str,  # type: ignore[no-untyped-def]
                                                         monkeypatch) -> None:
    import uuid

    from pitr.repo.format import META_KEY
    from pitr.repo.meta import new_meta
    from pitr.storage.s3 import MULTIPART_GRACE, S3Storage

    for k, v in moto_server.env().items():
        monkeypatch.setenv(k, v)
    prefix = f"t/{uuid.uuid4().hex[:6]}"
    s3 = S3Storage(s3_bucket, prefix, endpoint=moto_server.endpoint, region="us-east-1")
    s3.put(META_KEY, new_meta(1, 15, 16 << 20).to_json())
    c = moto_server.client()
    up = c.create_multipart_upload(Bucket=s3_bucket, Key=f"{prefix}/backups/B1/data/000001")
    c.upload_part(Bucket=s3_bucket, Key=f"{prefix}/backups/B1/data/000001", UploadId=up["UploadId"], PartNumber=1,
                  Body=b"x" * (5 << 20))
    other = c.create_multipart_upload(Bucket=s3_bucket, Key="elsewhere/x")  # outside this repository
    try:
        # moto reports a fixed Initiated time: judge ages from it
        [started] = [u["Initiated"].timestamp() for u in c.list_multipart_uploads(Bucket=s3_bucket)["Uploads"]
                     if u["UploadId"] == up["UploadId"]]
        assert gather_and_plan(s3, Policy(retain_full=1), started + 3600 * 2).temps == []  # may still be running
        later = started + MULTIPART_GRACE + 60
        p = gather_and_plan(s3, Policy(retain_full=1), later)
        assert [(t.key, t.upload_id) for t in p.temps] == [("backups/B1/data/000001", up["UploadId"])]
        apply(s3, p)
        left = [u["UploadId"] for u in c.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])]
        assert up["UploadId"] not in left and other["UploadId"] in left
        apply(s3, p)  # already gone: fine
    finally:
        c.abort_multipart_upload(Bucket=s3_bucket, Key="elsewhere/x", UploadId=other["UploadId"])
