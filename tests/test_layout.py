"""What a base backup copies and skips: pg/layout's rules, and the scan of a data directory built by hand."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pitr.ops.base.backup_files import ScanOptions, scan
from pitr.pg import layout


@pytest.mark.parametrize(("name", "skipped"), [
    ("postmaster.pid", True), ("postmaster.opts", True), ("backup_label", True), ("tablespace_map", True),
    ("backup_manifest", True), ("postgresql.auto.conf.tmp", True), ("current_logfiles", True),
    ("standby.signal", True), ("recovery.signal", True), ("pg_internal.init", True),
    ("pg_internal.init.1234", True), ("pgsql_tmp", True), ("pgsql_tmp1234.0", True),
    ("postgresql.conf", False), ("postgresql.auto.conf", False), ("PG_VERSION", False), ("pg_control", False),
    ("16384", False), ("backup_label.old", False),
])
def test_skip_name(name: str, skipped: bool) -> None:
    assert layout.skip_name(name) is skipped


def test_db_dir_skips_temp_and_unlogged_but_keeps_init_forks() -> None:
    names = ["1259", "1259_fsm", "1259_vm", "16384", "16384.1", "16384_fsm", "16384_vm", "16384_init",
             "16390_init", "t3_16400", "t3_16400_fsm", "t12_16401.2", "PG_VERSION", "pg_filenode.map"]
    assert layout.db_dir_skips(names) == {"16384", "16384.1", "16384_fsm", "16384_vm", "t3_16400",
                                          "t3_16400_fsm", "t12_16401.2"}


@pytest.mark.parametrize(("rel", "expected"), [
    ("base/5", True), ("base/5/16384", False), ("global", False),
    ("pg_tblspc/16385/PG_15_202209061/5", True), ("pg_tblspc/16385/PG_15_202209061", False),
])
def test_is_db_dir(rel: str, expected: bool) -> None:
    assert layout.is_db_dir(rel) is expected


@pytest.mark.parametrize(("rel", "expected"), [
    ("base/5/16384", True), ("base/5/16384.3", True), ("base/5/16384_vm", True), ("global/1262", True),
    ("global/pg_control", False), ("global/pg_filenode.map", False), ("base/5/PG_VERSION", False),
    ("pg_tblspc/16385/PG_18_202506291/5/16386_fsm", True), ("pg_xact/0000", False),
])
def test_has_page_checksums(rel: str, expected: bool) -> None:
    assert layout.has_page_checksums(rel) is expected


def test_stats_temp_rel() -> None:
    assert layout.stats_temp_rel("pg_stat_tmp", "/d") == "pg_stat_tmp"
    assert layout.stats_temp_rel("/d/stats", "/d") == "stats"
    assert layout.stats_temp_rel("/run/pg_stats", "/d") is None
    assert layout.stats_temp_rel(None, "/d") is None


def _tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def test_scan_a_handmade_data_directory(tmp_path: Path) -> None:
    pgdata = tmp_path / "data"
    spc = tmp_path / "spc"
    _tree(pgdata, {
        "PG_VERSION": b"15\n", "postgresql.conf": b"", "postmaster.pid": b"1", "postmaster.opts": b"x",
        "global/pg_control": b"c" * 8192, "global/1262": b"p" * 8192, "global/pg_internal.init": b"i",
        "base/5/16384": b"a" * 16384, "base/5/16384.1": b"a" * 8192, "base/5/16390": b"u",
        "base/5/16390_init": b"", "base/5/t3_16400": b"t", "base/pgsql_tmp/pgsql_tmp1.0": b"x",
        "pg_wal/000000010000000000000001": b"w", "pg_wal/archive_status/000000010000000000000001.ready": b"",
        "pg_wal/summaries/x.summary": b"s", "pg_replslot/slot1/state": b"s", "pg_stat_tmp/global.stat": b"s",
        "pg_subtrans/0000": b"s", "pg_xact/0000": b"x", "pg_notify/0000": b"n", "stats/db.stat": b"s",
        "standby.signal": b"", "current_logfiles": b"log",
    })
    for d in ("pg_dynshmem", "pg_serial", "pg_snapshots", "pg_tblspc"):
        (pgdata / d).mkdir()
    os.chmod(pgdata / "pg_xact", 0o750)
    _tree(spc, {"PG_15_202209061/5/16386": b"s" * 8192, "PG_14_202107181/5/99": b"old"})
    os.symlink(spc, pgdata / "pg_tblspc" / "16385")
    os.mkfifo(pgdata / "a_fifo")

    got = scan(pgdata, ScanOptions("PG_15_202209061", checksums=True, relseg_blocks=131072,
                                   extra_empty=("stats",)))
    files = {f.rel: f for f in got.files}
    assert set(files) == {"PG_VERSION", "postgresql.conf", "global/1262", "base/5/16384", "base/5/16384.1",
                          "base/5/16390_init", "pg_xact/0000", "pg_tblspc/16385/PG_15_202209061/5/16386"}
    assert [f.rel for f in got.last] == ["global/pg_control"]
    assert files["base/5/16384.1"].blkno_base == 131072 and files["base/5/16384.1"].checksummed
    assert not files["PG_VERSION"].checksummed
    assert files["base/5/16384"].size == 16384
    dirs = {d.path: d.mode for d in got.dirs}
    for kept in ("pg_wal", "pg_wal/archive_status", "pg_wal/summaries", "pg_replslot", "pg_stat_tmp",
                 "pg_subtrans", "pg_notify", "pg_dynshmem", "pg_serial", "pg_snapshots", "pg_tblspc", "stats",
                 "base", "base/5", "global", "pg_tblspc/16385/PG_15_202209061",
                 "pg_tblspc/16385/PG_15_202209061/5"):
        assert kept in dirs, kept
    assert "pg_replslot/slot1" not in dirs and "base/pgsql_tmp" not in dirs
    assert "pg_tblspc/16385" not in dirs  # the link itself is the tablespace entry
    assert dirs["pg_xact"] == 0o750
    assert [(t.oid, t.location) for t in got.tablespaces] == [("16385", str(spc))]
    assert got.total_bytes == sum(f.size for f in got.files) + 8192
