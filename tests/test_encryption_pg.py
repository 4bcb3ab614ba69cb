"""Encryption at rest end to end in a directory (key file, PostgreSQL 15) and in S3 (moto, passphrase,
PostgreSQL 18), with compression off so nothing but the cipher hides the data.

The server archives through `pitr wal-push %p`; pitr takes a backup and a restore point; then a
plaintext marker written into a table appears in no object of the repository, a restore with
replay brings the table back (same checksum), no key / a wrong key exit 2 naming where the key was
looked for, key-rotate makes the new key work and the old one fail, and a flipped byte, a cut
object and two swapped object names fail authentication and are named.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from pitr.storage.base import Storage
from pitr.storage.fs import FsStorage
from pitr.storage.s3 import S3Storage
from tests.support.pg import PgCluster, chown_pg, make_tmpdir, pg_bin_dirs, rmtree_pg, run_as_postgres

pytestmark = pytest.mark.pg
MARKER = "PLAINTEXT-MARKER-7f3a9c"


def key_file(path: Path) -> Path:
    path.write_text(os.urandom(32).hex() + "\n")
    path.chmod(0o600)
    chown_pg(path)
    return path


def pitr(exe: Path, env: dict[str, str], *args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_as_postgres([exe, *map(str, args)], env=env, cwd="/tmp", check=False, timeout=timeout)


def ok(p: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


# Each repository kind (and with it each way to give the key: key file, passphrase) runs on one server
# version, and each version runs once: what is encrypted, and how, does not depend on the server version.
KIND_VERSION = {"fs": "15", "s3": "18"}


@pytest.mark.parametrize("kind", ["fs", "s3"])
def test_encrypted_repository_end_to_end(kind: str, pg_version: str, pg_bindir: Path, pitr_exe: Path,
                                         request: pytest.FixtureRequest) -> None:
    if pg_version != KIND_VERSION[kind] and KIND_VERSION[kind] in pg_bin_dirs():
        pytest.skip(f"the {kind} variant runs on PostgreSQL {KIND_VERSION[kind]} only (encryption does not depend "
                    "on the server version)")
    base = make_tmpdir("pitr-enc-")
    src = PgCluster(pg_bindir, base / "src", name=f"enc-{kind}")
    try:
        if kind == "fs":
            key_env = {"PITR_ENCRYPTION_KEY_FILE": str(key_file(base / "repo.key"))}
            env = {"PITR_REPO": f"file://{base / 'repo'}"}
            raw: Storage = FsStorage(base / "repo")
        else:
            moto = request.getfixturevalue("moto_env")
            bucket = moto.create_bucket(f"enc-{uuid.uuid4().hex[:12]}")
            key_env = {"PITR_ENCRYPTION_PASSPHRASE": "correct horse battery staple"}
            # async archiving: the helper process reaches the key the same way (environment), never via the spool
            env = {"PITR_REPO": f"s3://{bucket}/enc", "PITR_ARCHIVE_ASYNC": "true"} | moto.env()
            raw = S3Storage(bucket, "enc", endpoint=moto.endpoint)
        env |= {"PITR_COMPRESS": "none"}
        full = env | key_env
        src.initdb(f"archive_mode = on\narchive_command = '{pitr_exe} wal-push %p'\n")
        src.start(env=full)
        # no key configured: init --encrypt refuses and writes nothing
        p = pitr(pitr_exe, env, "init", "--encrypt", "--dbname", src.conninfo)
        assert p.returncode == 2 and "needs a key" in p.stderr and "PITR_ENCRYPTION_PASSPHRASE" in p.stderr, p.stderr
        # refused before the store is probed: not even the repository directory is made
        assert not (base / "repo" / "pitr.json").exists() if kind == "fs" else raw.stat("pitr.json") is None
        p = ok(pitr(pitr_exe, full, "init", "--encrypt", "--dbname", src.conninfo))
        assert "(encrypted)" in p.stdout and "A LOST KEY IS LOST DATA" in p.stderr
        src.sql("create table secrets (id int primary key, v text)")
        # ~7 MiB: the table's file is a large one (streamed in its own object), the catalogs go in bundles
        src.sql(f"insert into secrets select g, '{MARKER}-' || g from generate_series(1, 120000) g")
        ok(pitr(pitr_exe, full, "backup", "--dbname", src.conninfo, "--pgdata", src.data))
        src.sql(f"insert into secrets select g, '{MARKER}-after-' || g from generate_series(120001, 121000) g")
        ok(pitr(pitr_exe, full, "restore-point", "after-insert", "--no-wait", "--dbname", src.conninfo))
        src.sql("update secrets set v = v || '!' where id % 7 = 0")
        want = src.table_md5("secrets")
        src.wait_archived(src.switch_wal())
        spools = [p for p in (src.data / "pg_wal").glob("pitr_*") if p.is_dir()]
        assert spools  # archive_async is the default: both variants archive through the spool
        for spool in spools:
            for f in spool.rglob("*"):
                if f.is_file():
                    text = f.read_bytes()
                    assert b"correct horse" not in text and b"PASSPHRASE" not in text, f

        # no object holds the marker; every object but pitr.json is ciphertext; pitr.json holds no cluster facts
        objects = list(raw.list(""))
        kinds = {o.key.split("/")[0] for o in objects}
        assert {"wal", "backups", "restore-points", "pitr.json"} <= kinds, kinds
        assert max(o.size for o in objects if o.key.startswith("backups/")) > 6 << 20  # the streamed path ran
        sysid = str(src.scalar("select system_identifier from pg_control_system()"))
        for o in objects:
            body = raw.get(o.key)
            assert MARKER.encode() not in body, o.key
            if o.key == "pitr.json":
                assert sysid not in body.decode() and json.loads(body)["format"] == 2
            else:
                assert body.startswith(b"PITRAEAD"), o.key

        # no key / a wrong key: exit 2, naming where the key was looked for
        p = pitr(pitr_exe, env, "info")
        assert p.returncode == 2 and "no key was found" in p.stderr and "PITR_ENCRYPTION_KEY_FILE" in p.stderr, p.stderr
        wrong = {"PITR_ENCRYPTION_KEY_FILE": str(key_file(base / "wrong.key"))} if kind == "fs" else \
            {"PITR_ENCRYPTION_PASSPHRASE": "wrong"}
        p = pitr(pitr_exe, env | wrong, "info")
        assert p.returncode == 2 and "does not open the repository" in p.stderr, p.stderr
        assert "Traceback" not in p.stderr and key_env.get("PITR_ENCRYPTION_PASSPHRASE", "@@") not in p.stderr

        # restore with replay: the server's restore_command reaches the key through the environment
        dest = PgCluster(pg_bindir, base / "r1", name="r1")
        out = json.loads(ok(pitr(pitr_exe, full, "restore", "--pgdata", dest.data, "--json", "--replay",
                                 "--archive-mode", "off", "--replay-timeout", "240")).stdout)
        assert out["replay"]["reached"], out
        auto = (dest.data / "postgresql.auto.conf").read_text()
        assert "PASSPHRASE" not in auto and "correct horse" not in auto and ".key" not in auto
        dest.append_conf()
        dest.start(env=full)
        assert dest.table_md5("secrets") == want
        dest.stop()
        ok(pitr(pitr_exe, full, "verify"))

        # key-rotate: the new key opens everything, the old one nothing
        if kind == "fs":
            new_key = key_file(base / "new.key")
            ok(pitr(pitr_exe, full, "key-rotate", "--new-key-file", new_key))
            new_env = env | {"PITR_ENCRYPTION_KEY_FILE": str(new_key)}
        else:
            ok(pitr(pitr_exe, full | {"PITR_NEW_ENCRYPTION_PASSPHRASE": "new passphrase"}, "key-rotate"))
            new_env = env | {"PITR_ENCRYPTION_PASSPHRASE": "new passphrase"}
        p = pitr(pitr_exe, full, "info")
        assert p.returncode == 2 and "does not open the repository" in p.stderr, p.stderr
        assert "Encryption   on" in ok(pitr(pitr_exe, new_env, "info")).stdout
        dest2 = PgCluster(pg_bindir, base / "r2", name="r2")
        ok(pitr(pitr_exe, new_env, "restore", "--pgdata", dest2.data, "--json", "--replay", "--archive-mode", "off",
                "--replay-timeout", "240", "--target-name", "after-insert"))
        dest2.append_conf()
        dest2.start(env=new_env)
        assert dest2.table_md5("secrets").startswith("121000:")
        dest2.stop()
        if kind == "fs":
            tamper_and_verify(pitr_exe, new_env, base / "repo")
    finally:
        src.ensure_stopped()
        rmtree_pg(base)


def tamper_and_verify(exe: Path, env: dict[str, str], repo: Path) -> None:
    """A flipped byte, a cut object and two swapped names: verify fails and names each object."""
    segs = sorted(p for p in (repo / "wal").rglob("0*") if p.is_file() and len(p.name) == 24)
    data = sorted(p for p in (repo / "backups").rglob("data/*") if p.is_file())
    assert len(segs) >= 3 and data
    flipped, swap_a, swap_b, cut = segs[0], segs[1], segs[2], data[0]
    b = bytearray(flipped.read_bytes())
    b[len(b) // 2] ^= 0x01
    flipped.write_bytes(b)
    cut.write_bytes(cut.read_bytes()[:-100])
    a, bb = swap_a.read_bytes(), swap_b.read_bytes()
    swap_a.write_bytes(bb)
    swap_b.write_bytes(a)
    p = pitr(exe, env, "verify")
    assert p.returncode == 1, p.stdout + p.stderr
    for obj in (flipped, swap_a, swap_b, cut):
        key = str(obj.relative_to(repo))
        lines = [ln for ln in p.stdout.splitlines() if key in ln]
        assert lines and all("fails authentication" in ln for ln in lines), (key, p.stdout)
    # wal-fetch of a tampered segment is a hard failure (>125), never "not archived"
    p = pitr(exe, env, "wal-fetch", flipped.name, "/tmp/never-" + flipped.name)
    assert p.returncode > 125 and "fails authentication" in p.stderr, p.stderr
