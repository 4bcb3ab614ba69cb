"""Find what a base backup copies: walk PGDATA and every tablespace, applying pg/layout's rules.

Runs after the backup has started. Files may vanish or change size while we walk and while
they are read later: a vanished file is simply not copied, a changed one is copied as read
(WAL replay from the backup's start makes them consistent). global/pg_control is returned
apart, to be copied after everything else, as pg_basebackup does.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from pitr.errors import BackupError
from pitr.pg import layout
from pitr.repo.manifest import DirEntry, Tablespace


@dataclass(frozen=True)
class SourceFile:
    rel: str  # path in the manifest (relative to PGDATA; tablespace files under pg_tblspc/<oid>/…)
    path: str  # where to read it
    size: int  # at scan time: we copy at most this much (the rest is written during the backup)
    checksummed: bool  # made of pages with checksums to verify
    blkno_base: int = 0  # relation block number of the file's first page
    mtime: float = 0.0  # at scan time: what an incremental backup compares with its parent's (backup_incr)
    mode: int = -1  # st_mode & 0o7777 at scan time (-1: unknown)


@dataclass
class Scan:
    files: list[SourceFile] = field(default_factory=list)
    last: list[SourceFile] = field(default_factory=list)  # copied after all others (pg_control)
    dirs: list[DirEntry] = field(default_factory=list)
    tablespaces: list[Tablespace] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files) + sum(f.size for f in self.last)


@dataclass(frozen=True)
class ScanOptions:
    version_dir: str  # PG_<major>_<catversion>: the tablespace subdirectory that belongs to this server
    checksums: bool = False
    relseg_blocks: int = 131072  # RELSEG_SIZE: blocks per relation segment file (1 GiB / 8 KiB)
    block_size: int = 8192
    extra_empty: tuple[str, ...] = ()  # e.g. a stats_temp_directory inside PGDATA


def scan(pgdata: Path, opts: ScanOptions) -> Scan:
    out = Scan()
    _Walker(opts, out).walk(str(pgdata), "")
    out.files.sort(key=lambda f: f.rel)
    out.dirs.sort(key=lambda d: d.path)
    return out


class _Walker:
    def __init__(self, opts: ScanOptions, out: Scan) -> None:
        self.opts = opts
        self.out = out

    def walk(self, path: str, rel_dir: str, dirs_only: bool = False) -> None:
        try:
            entries = list(os.scandir(path))
        except FileNotFoundError:
            return  # dropped while we walked (a database, a tablespace)
        except PermissionError:
            raise BackupError(f"cannot read the directory {path}: permission denied",
                              "run pitr backup as the PostgreSQL server's OS user (e.g. postgres)") from None
        skips = layout.db_dir_skips(e.name for e in entries) if layout.is_db_dir(rel_dir) else set()
        for e in entries:
            name = e.name
            if layout.skip_name(name) or name in skips:
                continue
            rel = f"{rel_dir}/{name}" if rel_dir else name
            try:
                st = os.stat(e.path)  # follows symlinks (pg_wal, pg_tblspc entries, linked config files)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                self.out.dirs.append(DirEntry(rel, stat.S_IMODE(st.st_mode)))
                if rel == "pg_tblspc":
                    self.tablespaces(e.path)
                elif layout.empties_contents(rel, self.opts.extra_empty):
                    if layout.keeps_subdirs_of(rel):
                        self.walk(e.path, rel, dirs_only=True)
                else:
                    self.walk(e.path, rel, dirs_only)
            elif stat.S_ISREG(st.st_mode) and not dirs_only:
                self.file(e.path, rel, st.st_size, st.st_mtime, stat.S_IMODE(st.st_mode))
            # sockets, fifos, dangling links: nothing a restore could use

    def file(self, path: str, rel: str, size: int, mtime: float = 0.0, mode: int = -1) -> None:
        checked = self.opts.checksums and layout.has_page_checksums(rel)
        base = 0
        if checked:
            r = layout.relation_file(rel.rsplit("/", 1)[-1])
            base = r[2] * self.opts.relseg_blocks if r else 0
        f = SourceFile(rel, path, size, checked, base, mtime, mode)
        (self.out.last if rel == layout.CONTROL_FILE else self.out.files).append(f)

    def tablespaces(self, tblspc: str) -> None:
        try:
            entries = sorted(os.scandir(tblspc), key=lambda e: e.name)
        except FileNotFoundError:
            return
        for e in entries:
            rel = f"pg_tblspc/{e.name}"
            if e.is_symlink():
                location = os.readlink(e.path)
                self.out.tablespaces.append(Tablespace(e.name, location))
                vdir = os.path.join(e.path, self.opts.version_dir)
                try:
                    st = os.stat(vdir)
                except FileNotFoundError:
                    continue  # created after the backup started, or dropped: WAL replay handles both
                rel_v = f"{rel}/{self.opts.version_dir}"
                self.out.dirs.append(DirEntry(rel_v, stat.S_IMODE(st.st_mode)))
                self.walk(vdir, rel_v)
            elif e.is_dir():  # an in-place tablespace (allow_in_place_tablespaces): a plain directory
                self.out.dirs.append(DirEntry(rel, stat.S_IMODE(e.stat().st_mode)))
                self.walk(e.path, rel)
