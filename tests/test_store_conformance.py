"""A store that does not honour conditional creates cannot silently overwrite archived WAL.

s3rver 3.7.1 ignores If-None-Match: a conditional create of an archived name succeeds and replaces
it. `pitr init` and `pitr check --storage` prove the store's conditional create (a second create
refused; of racing creates exactly one wins) and refuse s3rver, with a hint naming
allow_unsafe_store; with that setting, wal-push looks before it writes and reads back after.
moto and a directory pass. WAL goes up in one PutObject, never a multipart upload.
"""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pitr.errors import ConflictError, StorageError
from pitr.ops.admin.init import init_repo
from pitr.ops.admin.storecheck import conformance
from pitr.ops.wal import archive
from pitr.pg import walname
from pitr.pg.conn import ServerInfo
from pitr.repo import envelope
from pitr.repo.envelope import Codec, encode
from pitr.repo.format import META_KEY, wal_key
from pitr.repo.meta import new_meta, read_meta
from pitr.storage.fs import FsStorage
from pitr.storage.memory import MemoryStorage
from pitr.storage.s3 import S3Storage
from tests.support import s3rver
from tests.support.envelope_v1 import encode_v1
from tests.support.s3 import MotoServer
from tests.support.walgen import SEG, SYSID, segment

PITR = Path(sys.executable).parent / "pitr"
NAME = "000000010000000000000007"
SERVER = ServerInfo(150010, SYSID, SEG, "/nowhere", False)


@pytest.fixture(scope="module")
def lying() -> Iterator[s3rver.S3rver]:
    why = s3rver.ensure_installed()
    if why:
        pytest.skip(why)
    server = s3rver.S3rver().start()
    yield server
    server.stop()


@pytest.fixture
def lying_env(lying: s3rver.S3rver, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for k, v in lying.env().items():
        monkeypatch.setenv(k, v)
    return lying.env()


def run(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ["PATH"], "HOME": "/tmp", "LANG": "C.UTF-8", "PITR_CONFIG": "/dev/null"}
    return subprocess.run([str(PITR), *map(str, args)], env=base | env, capture_output=True, text=True,
                          timeout=180, stdin=subprocess.DEVNULL)


def props(st: object, **kw: bool) -> dict[str, bool]:
    return {p.name: p.ok for p in conformance(st, **kw)}  # type: ignore[arg-type]


def seg_file(tmp_path: Path, seed: int) -> Path:
    d = tmp_path / f"pg_wal{seed}"
    d.mkdir()
    p = d / NAME
    p.write_bytes(segment(NAME, seed=seed))
    return p


# --------------------------------------------------------------------------- the lying store

def test_s3rver_fails_the_conditional_create_properties(lying_env: dict[str, str], lying: s3rver.S3rver) -> None:
    st = S3Storage(s3rver.BUCKET, "props", endpoint=lying.endpoint, part_size=5 << 20)
    got = props(st)
    assert got["conditional-create"] is False and got["atomic-conditional-create"] is False
    assert got["read-after-write"] and got["listing"] and got["multipart"]
    assert list(st.list("")) == []  # the probes were removed


def test_check_storage_names_each_failing_property(lying_env: dict[str, str], lying: s3rver.S3rver) -> None:
    env = lying_env | {"PITR_REPO": f"s3://{s3rver.BUCKET}/check"}
    r = run("check", "--storage", env=env)
    assert r.returncode == 1, r.stderr
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert any("conditional-create: a create of an existing object was accepted and replaced it" in x for x in fails)
    assert any("atomic-conditional-create: 8 of 8 racing creates" in x for x in fails)
    assert any("allow_unsafe_store" in x for x in fails), r.stdout
    assert r.stderr.startswith("pitr: error: the store behind s3://pitr/check lacks"), r.stderr
    assert "Traceback" not in r.stderr
    # accepted: shown, not counted; what is left (checksums: s3rver verifies none) still fails
    r = run("check", "--storage", "--json", env=env | {"PITR_ALLOW_UNSAFE_STORE": "true"})
    import json

    points = {p["name"]: p for p in json.loads(r.stdout)["points"]}
    assert points["conditional-create"]["ok"] and "accepted" in points["conditional-create"]["detail"]
    assert not points["checksums"]["ok"] and r.returncode == 1


def test_init_refuses_the_lying_store_unless_accepted(lying_env: dict[str, str], lying: s3rver.S3rver,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    st = S3Storage(s3rver.BUCKET, "init", endpoint=lying.endpoint)
    with pytest.raises(StorageError, match="fails pitr's conformance test: conditional-create") as e:
        init_repo(st, SERVER)
    assert e.value.hint and "allow_unsafe_store = true" in e.value.hint
    assert st.stat(META_KEY) is None  # nothing bound to a store pitr cannot trust
    caplog.set_level(logging.WARNING, "pitr.init")
    st = S3Storage(s3rver.BUCKET, "init", endpoint=lying.endpoint, trust_conditional=False)
    assert init_repo(st, SERVER, allow_unsafe_store=True).created
    assert "accepted because allow_unsafe_store is set" in caplog.text


def test_accepted_lying_store_still_never_overwrites_archived_wal(lying_env: dict[str, str], tmp_path: Path) -> None:
    """The issue's repro: a different file pushed under an archived name exited 0 and replaced it."""
    repo = f"s3://{s3rver.BUCKET}/wal-{os.getpid()}"
    env = lying_env | {"PITR_REPO": repo, "PITR_ALLOW_UNSAFE_STORE": "true"}
    st = S3Storage(s3rver.BUCKET, repo.split("/", 3)[3], endpoint=lying_env["PITR_S3_ENDPOINT"])
    st.put(META_KEY, new_meta(SYSID, 15, SEG).to_json())
    first, second = seg_file(tmp_path, 1), seg_file(tmp_path, 2)
    r = run("wal-push", first, env=env)
    assert r.returncode == 0, r.stderr
    r = run("wal-push", second, env=env)
    assert r.returncode == 1 and f"the archive already holds a different {NAME}; nothing was overwritten" in r.stderr
    r = run("wal-push", first, env=env)  # identical again: fine
    assert r.returncode == 0, r.stderr
    dest = tmp_path / "RECOVERYXLOG"
    r = run("wal-fetch", NAME, dest, env=env)
    assert r.returncode == 0, r.stderr
    assert dest.read_bytes() == first.read_bytes()


def test_untrusted_store_detects_a_lost_race_by_reading_back(tmp_path: Path) -> None:
    """Fault: between our look and our write another writer's object lands over ours."""

    class Racy(MemoryStorage):
        conditional_writes_trusted = False

        def put(self, key: str, data: object, *, if_absent: bool = False) -> None:  # type: ignore[override]
            super().put(key, data, if_absent=if_absent)  # type: ignore[arg-type]
            if key.startswith("wal/"):
                super().put(key, encode(segment(NAME, seed=9), Codec()))  # the racer's lands after ours

    st = Racy()
    st.put(META_KEY, new_meta(SYSID, 15, SEG).to_json())
    with pytest.raises(ConflictError, match=f"another writer stored a different {NAME} at the same moment"):
        archive.push(st, read_meta(st), seg_file(tmp_path, 1), Codec())


class Counting(MemoryStorage):
    """Counts ranged reads: what a re-push or an untrusted store's read-back costs in requests."""

    def __init__(self, trusted: bool = True) -> None:
        super().__init__()
        self.conditional_writes_trusted = trusted
        self.ranges: list[tuple[int, int | None]] = []

    def get_range(self, key: str, start: int, length: int | None = None) -> bytes:
        self.ranges.append((start, length))
        return super().get_range(key, start, length)


@pytest.mark.parametrize("trusted", [True, False], ids=["repush", "read-back"])
def test_checking_an_archived_segment_reads_its_trailer_once(tmp_path: Path, trusted: bool) -> None:
    """The same bytes archived by this pitr are recognised from the trailer alone (one ranged
    read); an older pitr's object (SHA-256) or a different segment costs the header too, and the
    different one is still refused."""
    st = Counting(trusted)
    st.put(META_KEY, new_meta(SYSID, 15, SEG).to_json())
    meta = read_meta(st)
    seg = seg_file(tmp_path, 1)
    first = archive.push(st, meta, seg, Codec())
    assert first.status == "stored"
    assert len(st.ranges) == (0 if trusted else 1)
    st.ranges.clear()
    assert archive.push(st, meta, seg, Codec()).status == "already-archived"
    assert st.ranges == [(-envelope.TRAILER_SIZE, None)]

    st.put(wal_key(NAME), encode_v1(seg.read_bytes()))  # as an older pitr archived it
    st.ranges.clear()
    assert archive.push(st, meta, seg, Codec()).status == "already-archived"
    assert len(st.ranges) == 2
    before = st.get(wal_key(NAME))
    st.ranges.clear()
    with pytest.raises(ConflictError, match=f"already holds a different {NAME}"):
        archive.push(st, meta, seg_file(tmp_path, 2), Codec())
    assert len(st.ranges) == 2 and st.get(wal_key(NAME)) == before


# --------------------------------------------------------------------------- honest stores

def test_moto_and_a_directory_pass(moto_server: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch,
                                   tmp_path: Path) -> None:
    for k, v in moto_server.env().items():
        monkeypatch.setenv(k, v)
    got = props(S3Storage(s3_bucket, "p", endpoint=moto_server.endpoint, part_size=5 << 20))
    assert got["conditional-create"] and got["atomic-conditional-create"], got
    assert got["read-after-write"] and got["listing"] and got["multipart"], got
    root = tmp_path / "repo"
    root.mkdir()
    assert all(props(FsStorage(root)).values())
    assert list(root.iterdir()) == []  # no probe left behind, not even a directory


def test_check_storage_on_a_directory(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    r = run("check", "--storage", env={"PITR_REPO": str(root)})
    assert r.returncode == 0, r.stdout + r.stderr
    names = [line.split()[1].rstrip(":") for line in r.stdout.splitlines()]
    assert names == ["read-after-write", "conditional-create", "atomic-conditional-create", "listing", "multipart"]
    assert all(line.startswith("ok") for line in r.stdout.splitlines())


def test_wal_goes_up_in_one_put_even_when_larger_than_a_part(moto_server: MotoServer, s3_bucket: str,
                                                             monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An incompressible 16 MiB segment is over the 5 MiB part size: still one conditional PutObject
    (a conditional multipart completion is not atomic on every store)."""
    for k, v in moto_server.env().items():
        monkeypatch.setenv(k, v)
    st = S3Storage(s3_bucket, "wal1", endpoint=moto_server.endpoint, part_size=5 << 20)
    st.put(META_KEY, new_meta(SYSID, 15, SEG).to_json())
    head = struct.pack("<HHIQI4xQII", 0xD110, 2, 1, walname.segment_start_lsn(NAME, SEG), 0, SYSID, SEG, 8192)
    p = tmp_path / NAME
    p.write_bytes(head + os.urandom(SEG - len(head)))
    r = archive.push(st, read_meta(st), p, Codec())
    assert r.stored_size > 5 << 20
    etag = st.client.head_object(Bucket=s3_bucket, Key=f"wal1/{wal_key(NAME)}")["ETag"]
    assert "-" not in etag, etag  # a multipart object's ETag ends in -<parts>
