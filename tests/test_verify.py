"""pitr verify: every damaged, missing or stray object is named, and verify changes nothing.

Real PostgreSQL 15 archives through `pitr wal-push` into a directory and into S3 (moto); the
unit tests build small repositories in memory (1 MiB segments with real page-header layout) for
the manifest/objects and timeline cases that are awkward to produce with a live server.
"""

from __future__ import annotations

import hashlib
import json
import struct
import uuid
from pathlib import Path

import blake3
import pytest

from pitr.pg import walname
from pitr.repo import envelope
from pitr.repo.format import META_KEY, backup_data_key, manifest_key, wal_key
from pitr.repo.manifest import FileEntry, Manifest, write_manifest
from pitr.repo.meta import new_meta
from pitr.storage.memory import MemoryStorage
from pitr.storage.s3 import S3Storage
from tests.support.envelope_v1 import encode_v1
from tests.support.maint import Repo, backup, data_keys, flip_byte, pg15_cluster, snapshot, start_repo
from tests.support.pg import PgCluster
from tests.support.s3 import MotoServer

SEG = 1 << 20
SYSID = 7300000000000000001


# --------------------------------------------------------------------------- in-memory repositories

def segment(tli: int, segno: int, sysid: int = SYSID) -> bytes:
    head = struct.pack("<HHIQI4xQII", 0xD110, 2, tli, segno * SEG, 0, sysid, SEG, 8192)
    return head + bytes(SEG - len(head))


def put_wal(storage: MemoryStorage, name: str, raw: bytes) -> None:
    storage.put(wal_key(name), envelope.encode(raw, envelope.Codec("zstd", 1)))


def seg(tli: int, n: int) -> str:
    return walname.seg_name(tli, n, SEG)


def fake_backup(storage: MemoryStorage, bid: str, tli: int, start: int, stop: int, legacy: bool = False) -> Manifest:
    """Two bundled files in data/000000, one in data/000001, one empty file. legacy: as an older pitr
    wrote it (version-1 envelopes, sha256 entries, format 1)."""

    def entry(path: str, raw: bytes, obj: str, offset: int, env: bytes) -> FileEntry:
        if legacy:
            return FileEntry(path, len(raw), hashlib.sha256(raw).hexdigest(), 0o600, 0.0, obj, offset, len(env))
        return FileEntry(path, len(raw), "", 0o600, 0.0, obj, offset, len(env), blake3=blake3.blake3(raw).hexdigest())

    files = []
    bundle = b""
    for i, raw in enumerate([b"alpha" * 100, b"beta" * 300]):
        env = encode_v1(raw, "zstd", 1) if legacy else envelope.encode(raw, envelope.Codec("zstd", 1))
        files.append(entry(f"base/1/{i}", raw, "data/000000", len(bundle), env))
        bundle += env
    storage.put(backup_data_key(bid, 0), bundle)
    raw = bytes(range(256)) * 64
    env = encode_v1(raw, "none") if legacy else envelope.encode(raw, envelope.Codec("none", 0))
    files.append(entry("base/1/big", raw, "data/000001", 0, env))
    storage.put(backup_data_key(bid, 1), env)
    files.append(FileEntry("empty", 0, "", 0o600, 0.0, None))
    m = Manifest(id=bid, type="full", system_identifier=SYSID, pg_version=15, pg_version_num=150000,
                 wal_segment_size=SEG, timeline=tli, start_lsn=walname.format_lsn(start * SEG + 40),
                 stop_lsn=walname.format_lsn(stop * SEG + 4000), start_wal=seg(tli, start), stop_wal=seg(tli, stop),
                 start_time="2024-01-01T00:00:00+00:00", stop_time="2024-01-01T00:01:00+00:00", compress="zstd:1",
                 backup_label="", tablespace_map=None, checksums_enabled=True, files=files, directories=[],
                 format=1 if legacy else 5)
    write_manifest(storage, m)
    return m


@pytest.fixture
def mem() -> MemoryStorage:
    """Timeline 1 segments 1..8, a backup B1 at 3..4; timeline 2 forks at segment 6 (history
    present) with segments 6..7 and a .partial of timeline 1's segment 6."""
    s = MemoryStorage()
    s.put(META_KEY, new_meta(SYSID, 15, SEG).to_json())
    for n in range(1, 9):
        put_wal(s, seg(1, n), segment(1, n))
    put_wal(s, walname.history_name(2), f"1\t{walname.format_lsn(6 * SEG + 500)}\tno recovery target\n".encode())
    for n in (6, 7):
        put_wal(s, seg(2, n), segment(1, n))  # the first segment of a new timeline keeps the old header
    put_wal(s, seg(1, 6) + ".partial", segment(1, 6))
    fake_backup(s, "B1", 1, 3, 4)
    return s


def run(storage: MemoryStorage, backup: str | None = None) -> list[tuple[str, str]]:
    from pitr.ops.proof.verify import VerifyOptions, verify

    res = verify(storage, VerifyOptions(backup, jobs=3))
    return [(p.kind, p.object) for p in res.problems]


def test_clean_repo_has_no_problems_and_counts(mem: MemoryStorage) -> None:
    from pitr.ops.proof.verify import VerifyOptions, verify

    res = verify(mem, VerifyOptions(None, jobs=2))
    assert res.problems == []
    c = res.checked
    assert (c.backups, c.backup_objects, c.files, c.wal_segments, c.wal_other, c.timelines) == (1, 2, 4, 10, 2, 2)
    assert c.bytes == sum(len(b) for k, (b, _t) in mem.objects.items() if k != META_KEY and "manifest" not in k)


def test_manifest_against_objects(mem: MemoryStorage) -> None:
    mem.put("backups/B1/data/000009", b"stray")  # not referenced
    body = bytearray(mem.get(backup_data_key("B1", 0)))
    mem.put(backup_data_key("B1", 0), bytes(body[:-10]))  # the second envelope is cut short
    mem.delete(backup_data_key("B1", 1))
    assert sorted(run(mem)) == [("corrupt", "backups/B1/data/000000"), ("extra", "backups/B1/data/000009"),
                                ("object-missing", "backups/B1/data/000001")]


def test_file_checksum_differs_from_manifest(mem: MemoryStorage) -> None:
    from pitr.repo.manifest import read_manifest

    m = read_manifest(mem, "B1")
    m.files[2].blake3 = "0" * 64  # the envelope is intact, the manifest disagrees
    m.system_identifier = 42
    write_manifest(mem, m)
    got = run(mem)
    assert ("file-mismatch", "backups/B1/data/000001") in got
    assert ("manifest", manifest_key("B1")) in got
    assert len(got) == 2


def test_a_backup_an_older_pitr_wrote_verifies_clean(mem: MemoryStorage) -> None:
    """Version-1 envelopes under sha256 entries (format 1) beside the new backup: no problem; a
    tampered sha256 entry is still a mismatch."""
    from pitr.repo.manifest import read_manifest

    fake_backup(mem, "B0", 1, 1, 2, legacy=True)
    for n in (1, 2):  # its WAL archived by the older pitr too
        mem.put(wal_key(seg(1, n)), encode_v1(segment(1, n), "zstd", 1))
    assert run(mem) == []
    m = read_manifest(mem, "B0")
    assert m.format == 1 and all(not f.blake3 for f in m.files)
    m.files[2].sha256 = "0" * 64
    write_manifest(mem, m)
    assert run(mem) == [("file-mismatch", "backups/B0/data/000001")]


def test_file_digest_of_the_other_algorithm_is_a_mismatch(mem: MemoryStorage) -> None:
    """An entry naming the trailer's very digest under the other algorithm's field does not bind the
    object: a v2 object's BLAKE3 as `sha256`, a v1 object's SHA-256 as `blake3` are mismatches."""
    from pitr.repo.manifest import read_manifest

    m = read_manifest(mem, "B1")
    m.files[2].sha256, m.files[2].blake3 = m.files[2].blake3, ""
    write_manifest(mem, m)
    assert run(mem) == [("file-mismatch", "backups/B1/data/000001")]
    fake_backup(mem, "B0", 1, 1, 2, legacy=True)
    m = read_manifest(mem, "B0")
    m.files[2].sha256, m.files[2].blake3, m.format = "", m.files[2].sha256, 5
    write_manifest(mem, m)
    assert sorted(run(mem)) == [("file-mismatch", "backups/B0/data/000001"),
                                ("file-mismatch", "backups/B1/data/000001")]


def test_wal_header_history_and_placement(mem: MemoryStorage) -> None:
    put_wal(mem, seg(1, 5), segment(1, 4))  # the bytes of another segment under this name
    put_wal(mem, seg(1, 8), segment(1, 8, sysid=99))  # another cluster's segment
    mem.delete(wal_key(walname.history_name(2)))
    raw = mem.get(wal_key(seg(1, 2)))
    mem.delete(wal_key(seg(1, 2)))
    mem.put("wal/0000000100000009/" + seg(1, 2), raw)  # stored under the wrong directory
    got = run(mem)
    assert ("wal-header", wal_key(seg(1, 5))) in got
    assert ("wal-header", wal_key(seg(1, 8))) in got
    assert ("history-missing", wal_key(walname.history_name(2))) in got
    assert ("misplaced", "wal/0000000100000009/" + seg(1, 2)) in got
    assert len(got) == 4


def test_gaps_are_reported_per_run_and_only_where_needed(mem: MemoryStorage) -> None:
    from pitr.ops.proof.verify import VerifyOptions, verify

    mem.delete(wal_key(seg(1, 1)))  # before the only backup's start: not a problem
    mem.delete(wal_key(seg(1, 4)))  # the backup's stop segment: needed to become consistent
    mem.delete(wal_key(seg(2, 7)))  # timeline 2's head... then its only successor is missing:
    put_wal(mem, seg(2, 9), segment(2, 9))  # 7 and 8 are a hole before timeline 2's head
    res = verify(mem, VerifyOptions(None, jobs=2))
    probs = {(p.kind, p.object): p.detail for p in res.problems}
    assert set(probs) == {("wal-missing", wal_key(seg(1, 4))), ("wal-missing", wal_key(seg(2, 7)))}
    assert "become consistent" in probs[("wal-missing", wal_key(seg(1, 4)))]
    hole = probs[("wal-missing", wal_key(seg(2, 7)))]
    assert "2 segments" in hole and "B1" in hole


def test_backup_option_reads_only_that_backup_and_its_wal(mem: MemoryStorage) -> None:
    from pitr.ops.proof.verify import VerifyOptions, verify

    fake_backup(mem, "B2", 2, 7, 7)
    flip = bytearray(mem.get(wal_key(seg(1, 1))))
    flip[30] ^= 1
    mem.put(wal_key(seg(1, 1)), bytes(flip))  # damaged, but B2 does not need it
    res = verify(mem, VerifyOptions("B2", jobs=2))
    assert res.ok, res.problems
    # B2 on timeline 2 from segment 7: 7 and 8? timeline 2's head is 7, so just 7, plus the history
    assert (res.checked.backups, res.checked.wal_segments, res.checked.wal_other) == (1, 1, 1)
    assert run(mem) == [("corrupt", wal_key(seg(1, 1)))]
    from pitr.errors import NotFoundError

    with pytest.raises(NotFoundError, match="backup NOPE does not exist"):
        verify(mem, VerifyOptions("NOPE"))


# --------------------------------------------------------------------------- real PostgreSQL

def problems_of(repo: Repo, *args: str) -> tuple[int, list[dict[str, str]], str]:
    r = repo.pitr("verify", "--json", *args)
    return r.returncode, json.loads(r.stdout)["problems"], r.stderr


def test_verify_names_corrupt_wal_corrupt_backup_file_and_gap(fs_repo: Repo) -> None:
    repo = fs_repo
    repo.churn(1)
    m = backup(repo)
    repo.churn(4)
    r = repo.pitr("verify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("OK")

    seg_size = 16 << 20
    after = [s for s in repo.segments() if walname.segno(s, seg_size) > walname.segno(m.stop_wal, seg_size)]
    assert len(after) >= 4
    corrupt_wal, gap, swapped, donor = after[0], after[1], after[2], after[3]
    flip_byte(repo.storage, wal_key(corrupt_wal), repo.storage.stat(wal_key(corrupt_wal)).size // 2)  # type: ignore[union-attr]
    data_key = data_keys(repo.storage, m)[0]
    flip_byte(repo.storage, data_key, repo.storage.stat(data_key).size // 2)  # type: ignore[union-attr]
    repo.storage.delete(wal_key(gap))
    repo.storage.put(wal_key(swapped), repo.storage.get(wal_key(donor)))  # a segment under the wrong name
    repo.fix_owner()
    before = snapshot(repo.storage)

    r = repo.pitr("verify")
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert any(ln.startswith(f"corrupt: {wal_key(corrupt_wal)}: ") for ln in lines), r.stdout
    assert any(ln.startswith(f"corrupt: {data_key}: the envelope of ") for ln in lines), r.stdout
    assert any(ln.startswith(f"wal-missing: {wal_key(gap)}: ") and m.id in ln for ln in lines), r.stdout
    assert any(ln.startswith(f"wal-header: {wal_key(swapped)}: ") for ln in lines), r.stdout
    assert "4 problem(s)" in r.stdout
    assert "verify found 4 problem(s)" in r.stderr and "Traceback" not in r.stderr

    rc, probs, _ = problems_of(repo, "--backup", m.id)
    assert rc == 1
    assert sorted((p["kind"], p["object"]) for p in probs) == sorted(
        [("corrupt", wal_key(corrupt_wal)), ("corrupt", data_key), ("wal-missing", wal_key(gap)),
         ("wal-header", wal_key(swapped))])
    assert snapshot(repo.storage) == before  # verify never writes


# --------------------------------------------------------------------------- S3

def test_s3_verify_check_and_expire_on_a_real_archive(tmp_pg_dir: Path, pitr_exe: Path, moto_server: MotoServer,
                                                      s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cron and monitoring lines of the runbook against S3: verify, check --max-rpo 5m, expire."""
    for k, v in moto_server.env().items():
        monkeypatch.setenv(k, v)  # the in-process S3Storage the test inspects the bucket with
    prefix = f"c/{uuid.uuid4().hex[:8]}"
    storage = S3Storage(s3_bucket, prefix, endpoint=moto_server.endpoint, region="us-east-1")
    env = moto_server.env() | {"PITR_REPO": f"s3://{s3_bucket}/{prefix}"}
    cluster: PgCluster = pg15_cluster(tmp_pg_dir)
    try:
        repo = start_repo(cluster, storage, env, pitr_exe)
        repo.churn(1)
        old = backup(repo)
        repo.churn(1)
        m = backup(repo)
        repo.churn(2)
        r = repo.pitr("verify", "--json", "--jobs", "4")
        assert r.returncode == 0, r.stdout + r.stderr
        out = json.loads(r.stdout)
        assert out["ok"] is True and out["problems"] == []
        assert out["checked"]["backups"] == 2 and out["checked"]["files"] == len(old.files) + len(m.files)
        assert out["checked"]["wal_segments"] == len(repo.segments())
        assert out["checked"]["bytes"] > 0

        r = repo.pitr("check", "--max-rpo", "5m")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "ok    rpo:" in r.stdout and "ok    wal-switch:" in r.stdout

        r = repo.pitr("expire", "--retain-full", "1")
        assert r.returncode == 0, r.stdout + r.stderr
        assert [o.key for o in storage.list(f"backups/{old.id}/")] == []
        assert min(repo.segments()) == m.start_wal
        r = repo.pitr("verify")
        assert r.returncode == 0, r.stdout + r.stderr

        victim = repo.segments()[-1]
        flip_byte(storage, wal_key(victim), 100)
        rc, probs, err = problems_of(repo)
        assert rc == 1 and "verify found 1 problem(s)" in err
        assert [(p["kind"], p["object"]) for p in probs] == [("corrupt", wal_key(victim))]
    finally:
        cluster.ensure_stopped()
