"""An independent base backup for restore tests: online, non-exclusive, written straight into the
repository layout (manifest + envelopes, small files bundled, large ones alone) without `pitr backup`.

It follows PostgreSQL's documented low-level backup API (pg_backup_start / copy / pg_backup_stop on
one connection), so restore tests do not depend on the backup code they would otherwise share bugs
with. Runs as root (reads the postgres-owned data dir directly).

legacy=True writes what an older pitr wrote: envelope version 1 (SHA-256 trailers) and `sha256`
entries in a format-1 manifest; otherwise envelope version 2 and `blake3` entries (format 5).
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from datetime import UTC, datetime
from pathlib import Path

import blake3
import psycopg

from pitr.pg import walname
from pitr.repo import envelope
from pitr.repo.format import backup_data_key
from pitr.repo.manifest import DirEntry, FileEntry, Manifest, Tablespace, write_manifest
from pitr.storage.base import Storage
from tests.support.envelope_v1 import encode_v1

SKIP_DIR_CONTENTS = {"pg_wal", "pg_replslot", "pg_dynshmem", "pg_notify", "pg_serial", "pg_snapshots",
                     "pg_stat_tmp", "pg_subtrans"}
SKIP_FILES = {"postmaster.pid", "postmaster.opts", "backup_label", "tablespace_map", "recovery.signal",
              "standby.signal", "postgresql.auto.conf.tmp"}
BUNDLE_FILE_MAX = 64 << 10
BUNDLE_MAX = 1 << 20


class _Writer:
    def __init__(self, storage: Storage, backup_id: str, bundle_file_max: int = BUNDLE_FILE_MAX,
                 legacy: bool = False) -> None:
        self.storage, self.id, self.bundle_file_max, self.legacy = storage, backup_id, bundle_file_max, legacy
        self.n = 0
        self.bundle = bytearray()
        self.bundle_entries: list[FileEntry] = []
        self.stored = 0

    def _next_key(self) -> tuple[str, str]:
        self.n += 1
        key = backup_data_key(self.id, self.n)
        return key, key.split("/", 2)[2]  # "data/000001"

    @property
    def format(self) -> int:
        return 1 if self.legacy else 5

    def add(self, e: FileEntry, data: bytes) -> None:
        """Store data's envelope and bind its digest in e (hashed here, not taken from pitr's writer)."""
        if self.legacy:
            env = encode_v1(data, "zstd", 1)
            e.sha256, e.blake3 = hashlib.sha256(data).hexdigest(), ""
        else:
            env = envelope.encode(data, envelope.Codec("zstd", 1))
            e.sha256, e.blake3 = "", blake3.blake3(data).hexdigest()
        if len(data) <= self.bundle_file_max:
            e.offset, e.length = len(self.bundle), len(env)
            self.bundle += env
            self.bundle_entries.append(e)
            if len(self.bundle) >= BUNDLE_MAX:
                self.flush()
            return
        key, rel = self._next_key()
        self.storage.put(key, env)
        e.object, e.offset, e.length = rel, 0, len(env)
        self.stored += len(env)

    def flush(self) -> None:
        if not self.bundle_entries:
            return
        key, rel = self._next_key()
        self.storage.put(key, bytes(self.bundle))
        for e in self.bundle_entries:
            e.object = rel
        self.stored += len(self.bundle)
        self.bundle = bytearray()
        self.bundle_entries = []


def _walk(root: Path, prefix: str, files: list[tuple[str, Path]], dirs: list[DirEntry],
          tablespaces: list[Tablespace] | None) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        rel = base.relative_to(root).as_posix()
        relp = prefix + ("" if rel == "." else rel)
        dirs.append(DirEntry(relp.rstrip("/") or ".", stat.S_IMODE(base.stat().st_mode)))
        top = relp.rstrip("/").split("/")[-1] if relp else ""
        if prefix == "" and rel in SKIP_DIR_CONTENTS:
            dirnames[:] = []
            continue
        for d in list(dirnames):
            p = base / d
            if p.is_symlink() and tablespaces is not None and rel == "pg_tblspc":
                loc = Path(os.readlink(p))
                tablespaces.append(Tablespace(d, str(loc)))
                dirnames.remove(d)
                _walk(loc, f"pg_tblspc/{d}/", files, dirs, None)
        for f in filenames:
            if prefix == "" and rel == "." and f in SKIP_FILES:
                continue
            if f.startswith("pgsql_tmp") or top == "pgsql_tmp":
                continue
            files.append(((f"{relp.rstrip('/')}/{f}" if relp.rstrip("/") else f), base / f))


def synth_backup(conninfo: str, pgdata: Path, storage: Storage, backup_id: str | None = None, *,
                 legacy: bool = False) -> Manifest:
    """Take an online backup of the cluster at pgdata (archive_command must reach `storage`)."""
    backup_id = backup_id or datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    t0 = time.monotonic()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        ver = int(conn.execute("show server_version_num").fetchone()[0])  # type: ignore[index]
        sysid = int(conn.execute("select system_identifier from pg_control_system()").fetchone()[0])  # type: ignore[index]
        segsize = int(conn.execute("select setting from pg_settings where name = 'wal_segment_size'")
                      .fetchone()[0])  # type: ignore[index]
        checksums = conn.execute("show data_checksums").fetchone()[0] == "on"  # type: ignore[index]
        fn = "pg_backup_start(%s, true)" if ver >= 150000 else "pg_start_backup(%s, true, false)"
        row = conn.execute(f"select l::text, pg_walfile_name(l), clock_timestamp() from {fn} l",
                           (backup_id,)).fetchone()
        assert row is not None
        start_lsn, start_wal, start_time = str(row[0]), str(row[1]), row[2]
        files: list[tuple[str, Path]] = []
        dirs: list[DirEntry] = []
        tablespaces: list[Tablespace] = []
        _walk(pgdata, "", files, dirs, tablespaces)
        w = _Writer(storage, backup_id, legacy=legacy)
        entries = []
        total = 0
        for rel, path in files:
            try:
                data = path.read_bytes()
                st = path.stat()
            except FileNotFoundError:
                continue  # dropped during the backup: WAL replay knows
            e = FileEntry(rel, len(data), "", stat.S_IMODE(st.st_mode), st.st_mtime, None)
            if data:
                w.add(e, data)
            entries.append(e)
            total += len(data)
        w.flush()
        stop_fn = ("pg_backup_stop(wait_for_archive => true)" if ver >= 150000
                   else "pg_stop_backup(false, true)")
        row = conn.execute(f"select b.lsn::text, b.labelfile, b.spcmapfile, clock_timestamp() from {stop_fn} b"
                           ).fetchone()
        assert row is not None
        stop_lsn, label, spcmap, stop_time = str(row[0]), str(row[1]), row[2], row[3]
    tli = int(start_wal[:8], 16)
    m = Manifest(
        id=backup_id, type="full", system_identifier=sysid, pg_version=ver // 10000, pg_version_num=ver,
        wal_segment_size=segsize, timeline=tli, start_lsn=start_lsn, stop_lsn=stop_lsn, start_wal=start_wal,
        stop_wal=walname.segment_of_lsn(tli, walname.parse_lsn(stop_lsn), segsize),
        start_time=start_time.astimezone(UTC).isoformat(), stop_time=stop_time.astimezone(UTC).isoformat(),
        compress="zstd:1", backup_label=label, tablespace_map=str(spcmap) if spcmap else None,
        checksums_enabled=checksums, files=entries, directories=dirs, tablespaces=tablespaces, bytes=total,
        stored_bytes=w.stored, duration=time.monotonic() - t0, pitr_version="synth", format=w.format)
    write_manifest(storage, m)
    return m


def fake_repo(storage: Storage, files: dict[str, bytes], *, modes: dict[str, int] | None = None,
              backup_id: str = "20260301T120000Z", segments: range = range(2, 6), sysid: int = 7000000000000000001,
              tablespaces: dict[str, str] | None = None, bundle_max: int = BUNDLE_FILE_MAX,
              legacy: bool = False) -> Manifest:
    """A repository holding one backup of made-up files (no PostgreSQL), for file-level restore tests.

    The backup is consistent at segment 2 of timeline 1; `segments` are archived (content is not
    read by a restore's planning)."""
    from pitr.repo.format import META_KEY, wal_key
    from pitr.repo.meta import new_meta

    storage.create()
    storage.put(META_KEY, new_meta(sysid, 15, walname.DEFAULT_SEG_SIZE).to_json())
    for no in segments:
        storage.put(wal_key(walname.seg_name(1, no)), envelope.encode(b"wal", envelope.Codec("none", 0)))
    modes = modes or {}
    w = _Writer(storage, backup_id, bundle_max, legacy)
    entries = []
    for rel, data in files.items():
        e = FileEntry(rel, len(data), "", modes.get(rel, 0o600), 1767225600.0, None)
        if data:
            w.add(e, data)
        entries.append(e)
    w.flush()
    dirs = sorted({str(Path(r).parent) for r in files if "/" in r})
    ts = tablespaces or {}
    m = Manifest(
        id=backup_id, type="full", system_identifier=sysid, pg_version=15, pg_version_num=150000,
        wal_segment_size=walname.DEFAULT_SEG_SIZE, timeline=1, start_lsn="0/2000028", stop_lsn="0/2000100",
        start_wal=walname.seg_name(1, 2), stop_wal=walname.seg_name(1, 2),
        start_time="2026-03-01T11:59:58+00:00", stop_time="2026-03-01T12:00:00+00:00", compress="zstd:1",
        backup_label="START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n",
        tablespace_map="".join(f"{oid} {loc}\n" for oid, loc in ts.items()) or None,
        checksums_enabled=True, files=entries,
        directories=[DirEntry(".", 0o700)] + [DirEntry(d, 0o700) for d in dirs if not _is_ts_link(d, ts)],
        tablespaces=[Tablespace(o, loc) for o, loc in ts.items()], bytes=sum(len(v) for v in files.values()),
        stored_bytes=w.stored, format=w.format)
    write_manifest(storage, m)
    return m


def _is_ts_link(d: str, ts: dict[str, str]) -> bool:
    parts = d.split("/")
    return len(parts) == 2 and parts[0] == "pg_tblspc" and parts[1] in ts
