"""wal-push validates what can be validated of the files that carry no system identifier.

.history and .backup files are plain text: a file that does not parse as what PostgreSQL writes,
does not match its own name, or contradicts the archived ancestry is refused with one sentence
and nothing is stored. A .partial is a segment: its page header must be this cluster's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pitr.errors import WalFileError
from pitr.ops.wal import archive
from pitr.repo.envelope import Codec
from pitr.repo.format import wal_key
from pitr.repo.meta import read_meta
from pitr.storage.fs import FsStorage
from tests.support.walgen import SYSID, fs_repo, segment

PITR = Path(sys.executable).parent / "pitr"

# what PostgreSQL 15 writes at the end of pg_basebackup (do_pg_backup_stop), verbatim in layout
REAL_BACKUP = ("START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
               "STOP WAL LOCATION: 0/2000138 (file 000000010000000000000002)\n"
               "CHECKPOINT LOCATION: 0/2000060\n"
               "BACKUP METHOD: streamed\n"
               "BACKUP FROM: primary\n"
               "START TIME: 2026-03-01 11:59:58 UTC\n"
               "LABEL: pg_basebackup base backup\n"
               "START TIMELINE: 1\n"
               "STOP TIME: 2026-03-01 12:00:00 UTC\n"
               "STOP TIMELINE: 1\n")
BACKUP_NAME = "000000010000000000000002.00000028.backup"


@pytest.fixture
def repo(tmp_path: Path) -> FsStorage:
    return fs_repo(tmp_path / "repo")


def push(repo: FsStorage, tmp_path: Path, name: str, data: bytes | str) -> str:
    d = tmp_path / "pg_wal"
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return archive.push(repo, read_meta(repo), p, Codec()).status


def refused(repo: FsStorage, tmp_path: Path, name: str, data: bytes | str, needle: str) -> None:
    with pytest.raises(WalFileError, match=needle) as e:
        push(repo, tmp_path, name, data)
    assert str(e.value).startswith(f"refusing to archive {name}: the file ")
    assert repo.stat(wal_key(name)) is None


def test_real_history_and_backup_files_are_archived(repo: FsStorage, tmp_path: Path) -> None:
    assert push(repo, tmp_path, "00000002.history", "1\t0/3000000\tno recovery target specified\n") == "stored"
    three = ("1\t0/3000000\tno recovery target specified\n\n"
             "2\t0/5000A28\tbefore 2026-03-01 12:00:00.000000+00\n")
    assert push(repo, tmp_path, "00000003.history", three) == "stored"
    assert push(repo, tmp_path, BACKUP_NAME, REAL_BACKUP) == "stored"
    # a backup taken on a standby that was promoted meanwhile: named after the stop timeline
    promoted = REAL_BACKUP.replace("STOP WAL LOCATION: 0/2000138 (file 000000010000000000000002)",
                                   "STOP WAL LOCATION: 0/3000138 (file 000000020000000000000003)"
                                   ).replace("STOP TIMELINE: 1", "STOP TIMELINE: 2")
    assert push(repo, tmp_path, "000000020000000000000002.00000028.backup", promoted) == "stored"


@pytest.mark.parametrize(("name", "text", "needle"), [
    ("00000001.history", "1\t0/3000000\tx\n", "timeline 1, which has no history file"),
    ("00000003.history", "3\t0/3000000\tx\n", "ancestors must be increasing and below 3"),
    ("00000003.history", "7\t0/3000000\tx\n", "ancestors must be increasing and below 3"),
    ("00000004.history", "2\t0/3000000\tx\n1\t0/4000000\ty\n", "names timeline 1 after 2"),
    ("00000004.history", "1\t0/5000000\tx\n2\t0/4000000\ty\n", "switch point 0/4000000 goes backwards"),
    ("00000002.history", "", "names no parent timeline"),
    ("00000002.history", "hello world\n", "not a timeline history file"),
    ("00000002.history", b"\x00\xff\xfe PITR binary", "not a timeline history file"),
    ("00000002.history", "1\t0/3000000\t" + "x" * (1 << 20) + "\n", "more than a history file may hold"),
])
def test_foreign_or_damaged_history_is_refused(repo: FsStorage, tmp_path: Path, name: str, text: str | bytes,
                                               needle: str) -> None:
    refused(repo, tmp_path, name, text, needle)


def test_history_contradicting_archived_ancestry_is_refused(repo: FsStorage, tmp_path: Path) -> None:
    push(repo, tmp_path, "00000002.history", "1\t0/3000000\tno recovery target specified\n")
    # another cluster's (or branch's) timeline 3, whose timeline 1 ended elsewhere
    refused(repo, tmp_path, "00000003.history", "1\t0/4000000\tx\n2\t0/5000000\ty\n",
            "disagrees with the archived history of timeline 2: timeline 1 ended at 0/3000000 there, at 0/4000000")
    # PostgreSQL writes only the new line when it could not read the parent's history: accepted
    assert push(repo, tmp_path, "00000003.history", "2\t0/5000000\ty\n") == "stored"


@pytest.mark.parametrize(("name", "text", "needle"), [
    (BACKUP_NAME, "hello\n", "no START and STOP WAL LOCATION lines"),
    (BACKUP_NAME, REAL_BACKUP.split("STOP WAL")[0], "no START and STOP WAL LOCATION lines"),
    ("000000010000000000000005.00000028.backup", REAL_BACKUP, "the name says segment 0000000000000005"),
    ("000000010000000000000002.00000100.backup", REAL_BACKUP, "at offset 00000100"),
    ("000000030000000000000002.00000028.backup", REAL_BACKUP, "timeline 3 is neither its start nor its stop"),
    (BACKUP_NAME, REAL_BACKUP.replace("0/2000028 (file", "0/7000028 (file"), "0/7000028 is not in"),
    (BACKUP_NAME, REAL_BACKUP.replace("STOP WAL LOCATION: 0/2000138", "STOP WAL LOCATION: 0/2000010"),
     "STOP WAL LOCATION precedes its START"),
    (BACKUP_NAME, REAL_BACKUP + "LABEL: " + "y" * (1 << 20), "more than a backup file may hold"),
])
def test_foreign_or_damaged_backup_file_is_refused(repo: FsStorage, tmp_path: Path, name: str, text: str,
                                                   needle: str) -> None:
    refused(repo, tmp_path, name, text, needle)


def test_backup_label_in_another_encoding_is_fine(repo: FsStorage, tmp_path: Path) -> None:
    data = REAL_BACKUP.replace("pg_basebackup base backup", "sauvegarde d'\xe9t\xe9").encode("latin-1")
    assert push(repo, tmp_path, BACKUP_NAME, data) == "stored"


def test_partial_is_checked_like_a_segment(repo: FsStorage, tmp_path: Path) -> None:
    seg = "000000010000000000000007"
    refused(repo, tmp_path, f"{seg}.partial", segment(seg, sysid=SYSID + 1), "belongs to the cluster with system")
    refused(repo, tmp_path, f"{seg}.partial", segment("000000010000000000000008"), "disagrees with its name")
    assert push(repo, tmp_path, f"{seg}.partial", segment(seg)) == "stored"


def test_cli_refuses_a_foreign_history_with_one_sentence(repo: FsStorage, tmp_path: Path) -> None:
    p = tmp_path / "00000005.history"
    p.write_text("9\t0/3000000\tanother cluster's\n")
    env = {"PATH": os.environ["PATH"], "HOME": "/tmp", "LANG": "C.UTF-8", "PITR_CONFIG": "/dev/null"}
    r = subprocess.run([str(PITR), "wal-push", str(p), "--repo", str(repo.root)], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0].startswith("pitr: error: refusing to archive 00000005.history: the file is not the history")
    assert len(lines) <= 2 and "Traceback" not in r.stderr
    assert repo.stat(wal_key(p.name)) is None


def test_the_archivers_reused_buffer_stores_each_file_exactly(repo: FsStorage, tmp_path: Path) -> None:
    """The async archiver reads segments into one buffer per thread: each stored object holds its own
    file's bytes (never the previous file's), a short or an oversized file is refused and nothing stored."""
    meta = read_meta(repo)
    buf = archive.thread_buffer(meta.wal_segment_size)
    first, second = "000000010000000000000031", "000000010000000000000032"
    for name, seed in ((first, 1), (second, 2)):
        (tmp_path / name).write_bytes(segment(name, seed=seed))
        assert archive.push(repo, meta, tmp_path / name, Codec("zstd", 1), buf).status == "stored"
    partial = f"{'000000010000000000000033'}.partial"
    (tmp_path / partial).write_bytes(segment(partial[:24], seed=3)[: meta.wal_segment_size])
    archive.push(repo, meta, tmp_path / partial, Codec("zstd", 1), buf)
    for name in (first, second, partial):
        out = tmp_path / f"back-{name}"
        archive.fetch(repo, meta, name, out)
        assert out.read_bytes() == (tmp_path / name).read_bytes(), name
    big, short = "000000010000000000000034", "000000010000000000000035"
    (tmp_path / big).write_bytes(segment(big) + b"x")
    (tmp_path / short).write_bytes(segment(short)[: 1 << 20])
    for name, size in ((big, meta.wal_segment_size + 1), (short, 1 << 20)):
        with pytest.raises(WalFileError, match=f"is {size} bytes, not the cluster's WAL segment size"):
            archive.push(repo, meta, tmp_path / name, Codec("zstd", 1), buf)
        assert repo.stat(wal_key(name)) is None
