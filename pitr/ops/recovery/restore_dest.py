"""Where a restore writes and whether it may: the destination's layout and every check on it.

- Layout maps manifest paths to the data directory or to tablespace locations (--tablespace-map).
- check_destination refuses, before anything is written: a running server's directory, a
  non-empty one without --delta (or with --delta, one that is not a data directory), a non-empty
  tablespace location, an owner that is root, a directory this user cannot write, too little space.
- The marker file `pitr-restore.incomplete` is written first and removed last, so an interrupted
  restore is recognisable; prepare_tree makes directories (with the manifest's modes, and the
  ones a base backup leaves out) and tablespace links; clean_for_delta removes what the backup
  does not have.

Containment (the repository is untrusted, docs/restore.md "Trust boundary"): manifest paths are
validated when read (repo/manifest.py); here every directory is made component by component
below its root, replacing a symbolic link found inside the root instead of following it, and only
what lies inside a root (or was created by pitr) is ever chmod-ed or chown-ed. In a tablespace
location a restore owns only the PG_<major>_<catalog> directory, and with --delta only when DIR's
own pg_tblspc/<oid> link already points at that location.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pitr.errors import RestoreError, UsageError
from pitr.pg.layout import REQUIRED_DIRS
from pitr.repo.manifest import Manifest
from pitr.storage import fs

MARKER = "pitr-restore.incomplete"
# Written by the finish step (from the manifest's fields), never copied from the file list.
ROOT_SKIP = {"postmaster.pid", "postmaster.opts", "backup_label", "tablespace_map", "recovery.signal",
             "standby.signal", "recovery.conf", "backup_label.old", "tablespace_map.old", MARKER}


@dataclass(frozen=True)
class Layout:
    """Where each manifest path goes: the data dir, or a tablespace location."""

    pgdata: Path
    tablespaces: dict[str, Path]  # oid -> location (after --tablespace-map)

    def dest(self, rel: str) -> Path:
        return self.root_of(rel)[1]

    def root_of(self, rel: str) -> tuple[Path, Path]:
        """(root, destination) of a manifest path; refuses one that would leave its root."""
        parts = rel.split("/")
        if len(parts) >= 3 and parts[0] == "pg_tblspc" and parts[1] in self.tablespaces:
            root, sub = self.tablespaces[parts[1]], parts[2:]
        else:
            root, sub = self.pgdata, parts
        if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in sub):
            raise RestoreError(f"refusing the manifest path {rel!r}: it would be written outside {root}")
        return root, root.joinpath(*sub)

    def is_link(self, rel: str) -> bool:
        parts = rel.split("/")
        return len(parts) == 2 and parts[0] == "pg_tblspc" and parts[1] in self.tablespaces

    def roots(self) -> list[Path]:
        return [self.pgdata, *self.tablespaces.values()]


def tablespace_locations(m: Manifest, remap: Mapping[str, Path]) -> dict[str, Path]:
    locs = {t.oid: Path(t.location) for t in m.tablespaces}
    if not locs and m.tablespace_map:
        for line in m.tablespace_map.splitlines():
            oid, _, path = line.partition(" ")
            if oid.isdigit() and path:
                locs[oid] = Path(path)
    unknown = sorted(set(remap) - set(locs))
    if unknown:
        raise UsageError(f"--tablespace-map names tablespace {unknown[0]}, which backup {m.id} does not have",
                         f"its tablespaces are: {', '.join(sorted(locs)) or 'none'}")
    return {oid: Path(remap.get(oid, p)).absolute() for oid, p in locs.items()}


def render_tablespace_map(m: Manifest, locs: Mapping[str, Path]) -> str | None:
    if not m.tablespace_map:
        return None
    out = []
    for line in m.tablespace_map.splitlines():
        oid, sep, _path = line.partition(" ")
        out.append(f"{oid} {locs[oid]}" if sep and oid in locs else line)
    return "\n".join(out) + "\n"


def live_postmaster(pgdata: Path) -> int | None:
    """The pid in pgdata/postmaster.pid when that process is alive (a running server), else None."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0].strip())
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, someone else's
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        if "postgres" not in comm and "postmaster" not in comm:
            return None  # a recycled pid: the lock file is stale
    except OSError:
        pass
    return pid


def nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


def data_owner(pgdata: Path) -> tuple[int, int] | None:
    """As root: whom to give the files (DIR's owner, else its parent's); refuses root. Else None."""
    if os.geteuid() != 0:
        return None
    ref = pgdata if pgdata.exists() else nearest_existing(pgdata.parent)
    st = ref.stat()
    if st.st_uid == 0:
        raise RestoreError(f"{ref} is owned by root, and PostgreSQL refuses to run as root",
                           f"chown {ref} to the PostgreSQL OS user (e.g. chown postgres: {ref}) and run again")
    return st.st_uid, st.st_gid


def check_destination(pgdata: Path, delta: bool, m: Manifest, layout: Layout) -> tuple[int, int] | None:
    """Every refusal about the destination, before anything is written. Returns the owner to use."""
    d = pgdata
    for oid, root in [("", d), *layout.tablespaces.items()]:
        _check_reachable(root, f"the location of tablespace {oid}" if oid else "the data directory")
    if d.exists() and not d.is_dir():
        raise RestoreError(f"{d} exists and is not a directory", "give --pgdata a directory path")
    if d.is_dir():
        pid = live_postmaster(d)
        if pid is not None:
            raise RestoreError(f"{d} belongs to a running PostgreSQL server (pid {pid}); a restore would "
                               "destroy it", "stop that server first, or restore into another directory")
        entries = sorted(os.listdir(d))
        if entries and not delta:
            why = ("an earlier restore into it was interrupted" if MARKER in entries else "it is not empty")
            raise RestoreError(f"refusing to restore into {d}: {why}",
                               "use --delta to restore over it (keeping files that match), or give an empty "
                               "or new directory")
        if entries and delta and not ({"PG_VERSION", MARKER} & set(entries)):
            raise RestoreError(f"refusing --delta on {d}: it does not look like a PostgreSQL data directory "
                               "(no PG_VERSION), so pitr will not delete its contents",
                               "give the cluster's data directory, or an empty or new directory")
        if entries and delta:
            _check_same_version(d, m)
    _check_locations(layout)
    for oid, loc in layout.tablespaces.items():
        if loc.exists() and not loc.is_dir():
            raise RestoreError(f"the location {loc} of tablespace {oid} exists and is not a directory",
                               f"restore it elsewhere with --tablespace-map {oid}=/new/dir")
        if loc.is_dir() and os.listdir(loc) and not (delta and owns_location(layout, oid)):
            # --delta refreshes only the location DIR itself uses; any other is someone else's
            # (the live source cluster's on this host, another cluster's, an operator's files)
            why = (f"and {d}/pg_tblspc/{oid} does not link to it, so it is not this data directory's to refresh"
                   if delta else "")
            raise RestoreError(f"the location {loc} of tablespace {oid} is not empty {why}".strip(),
                               f"restore the tablespace elsewhere with --tablespace-map {oid}=/new/dir"
                               + ("" if delta else ", or use --delta to refresh a copy whose link points there"))
    owner = data_owner(d)
    for root in layout.roots():
        ref = nearest_existing(root)
        if os.geteuid() != 0 and not os.access(ref, os.W_OK | os.X_OK):
            raise RestoreError(f"{ref} is not writable by this user",
                               "run the restore as the PostgreSQL OS user that owns the directory")
    if not delta:
        _check_space(m, layout)
    return owner


def _check_reachable(path: Path, what: str) -> None:
    """Refuse, in one sentence, a path this user cannot look at or into (instead of an OSError later)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return  # made by the restore (its parent's writability is checked below)
    except NotADirectoryError:
        raise RestoreError(f"cannot use {path} as {what}: one of its parents is not a directory",
                           "give a path whose parents are directories") from None
    except PermissionError:
        blocked = next((q for q in reversed(path.parents) if q.is_dir() and not os.access(q, os.X_OK)), path.parent)
        raise RestoreError(f"cannot reach {what} {path}: this user may not enter {blocked} (permission denied)",
                           f"run the restore as a user that can enter {blocked}, or give another directory") from None
    if stat.S_ISDIR(st.st_mode) and not os.access(path, os.R_OK | os.X_OK):
        raise RestoreError(f"cannot read {what} {path} (permission denied)",
                           "run the restore as the PostgreSQL OS user that owns it, or give another directory")


def _check_locations(layout: Layout) -> None:
    """Tablespace locations: absolute, not /, not the data directory or inside it, not nested."""
    d = layout.pgdata
    real_d = Path(os.path.realpath(d))
    seen: list[tuple[str, Path]] = []
    for oid, loc in sorted(layout.tablespaces.items()):
        fix = f"give it another location with --tablespace-map {oid}=/new/dir"
        if loc == Path("/") or not loc.is_absolute():
            raise RestoreError(f"refusing the location {loc} of tablespace {oid}: not a usable directory", fix)
        real = Path(os.path.realpath(loc))
        for a, b in ((loc, d), (real, real_d)):
            if a == b or b in a.parents or a in b.parents:
                raise RestoreError(f"refusing the location {loc} of tablespace {oid}: it is, contains or lies "
                                   f"inside the data directory {d}", fix)
        for other, oloc in seen:
            if oloc == real or oloc in real.parents or real in oloc.parents:
                raise RestoreError(f"refusing the locations of tablespaces {other} and {oid}: they overlap "
                                   f"({oloc}, {real})", fix)
        seen.append((oid, real))


def owns_location(layout: Layout, oid: str) -> bool:
    """Whether DIR's own pg_tblspc/<oid> is a link that already points at the layout's location."""
    link = layout.pgdata / "pg_tblspc" / oid
    if not link.is_symlink():
        return False
    loc = layout.tablespaces[oid]
    return os.readlink(link) == str(loc) or os.path.realpath(link) == os.path.realpath(loc)


def _check_same_version(d: Path, m: Manifest) -> None:
    try:
        have = (d / "PG_VERSION").read_text().strip()
    except OSError:
        return
    if have and have != str(m.pg_version):
        raise RestoreError(f"refusing --delta on {d}: it holds PostgreSQL {have} and the backup is PostgreSQL "
                           f"{m.pg_version}", "restore into an empty directory")


def _check_space(m: Manifest, layout: Layout) -> None:
    need: dict[int, int] = {}
    where: dict[int, Path] = {}
    for f in m.files:
        root = nearest_existing(layout.dest(f.path).parent)
        try:
            dev = root.stat().st_dev
        except OSError:
            continue
        need[dev] = need.get(dev, 0) + f.size
        where.setdefault(dev, root)
    for dev, n in need.items():
        free = shutil.disk_usage(where[dev]).free
        if n > free:
            raise RestoreError(f"not enough free space for the restore: it needs {n >> 20} MiB on the filesystem "
                               f"of {where[dev]}, which has {free >> 20} MiB free",
                               "free some space or restore elsewhere")


def root_mode(m: Manifest) -> int:
    for d in m.directories:
        if d.path in ("", "."):
            return 0o750 if d.mode & 0o050 else 0o700
    return 0o700


def write_marker(pgdata: Path, m: Manifest, owner: tuple[int, int] | None, mode: int) -> None:
    pgdata.mkdir(parents=True, exist_ok=True)
    os.chmod(pgdata, mode)
    if owner:
        os.chown(pgdata, *owner)
    body = json.dumps({"backup": m.id, "pid": os.getpid(), "started": time.time(),
                       "note": "a pitr restore into this directory has not completed; do not start PostgreSQL "
                               "on it. Restore again (with --delta to keep what is already here)."}) + "\n"
    write_small(pgdata / MARKER, body.encode(), owner, 0o600)
    fsync_dir(pgdata)
    fsync_dir(pgdata.parent)


def write_small(path: Path, data: bytes, owner: tuple[int, int] | None, mode: int) -> None:
    if path.is_symlink() or path.is_dir():
        remove_path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        if owner:
            os.fchown(fd, *owner)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make path's entries durable; a failure fails the restore (before pg_control is written)."""
    try:
        fs.fsync_dir(path)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM) and path.is_dir():
            return  # a parent this user may not open (e.g. /): nothing of the restore's to flush there
        raise RestoreError(f"cannot flush {path} to disk: {e.strerror}; the restore is not durable",
                           "check the filesystem and the disk (dmesg), and restore again") from None


def remove_path(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def _set(path: Path, mode: int, owner: tuple[int, int] | None) -> None:
    os.chmod(path, mode, follow_symlinks=False)
    if owner:
        os.chown(path, *owner, follow_symlinks=False)


def _mkdir(root: Path, path: Path, mode: int, owner: tuple[int, int] | None, fix_last: bool = True) -> None:
    """Make path below root one component at a time. A file or symbolic link found on the way is
    replaced by a directory (never followed: it could lead outside root). New directories get
    mode and owner; of the existing ones only path itself (with fix_last), never one outside root."""
    rel = path.relative_to(root)  # ValueError: a bug, Layout.root_of keeps paths inside
    cur = root
    for i, part in enumerate(rel.parts):
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            if fix_last and i == len(rel.parts) - 1:
                _set(cur, mode, owner)
            continue
        if st is not None:
            cur.unlink()  # a file or link inside the root: the link itself goes, never its target
        os.mkdir(cur, mode)
        _set(cur, mode, owner)


def _make_root(root: Path, mode: int, owner: tuple[int, int] | None) -> None:
    """Create a tablespace location (and missing parents); chmod/chown only what is created here
    and the location itself, never an existing parent."""
    missing = []
    p = root
    while not p.exists() and not p.is_symlink() and p.parent != p:
        missing.append(p)
        p = p.parent
    for q in reversed(missing):
        os.mkdir(q, mode)
        _set(q, mode, owner)
    if not root.is_dir():
        raise RestoreError(f"the tablespace location {root} is not a directory")
    os.chmod(root, mode)
    if owner:
        os.chown(root, *owner)


def prepare_tree(m: Manifest, layout: Layout, owner: tuple[int, int] | None, dir_mode: int) -> None:
    """Directories with the manifest's modes, tablespace locations and links, required dirs."""
    for loc in layout.tablespaces.values():
        _make_root(loc, dir_mode, owner)
    for d in sorted(m.directories, key=lambda x: x.path.count("/")):
        if d.path in ("", ".") or layout.is_link(d.path):
            continue
        _mkdir(*layout.root_of(d.path), (d.mode & 0o7777) or dir_mode, owner)
    for rel in REQUIRED_DIRS + (("pg_wal/summaries",) if m.pg_version >= 17 else ()):
        _mkdir(layout.pgdata, layout.pgdata / rel, dir_mode, owner, fix_last=False)
    # every file's parent chain: made, or checked to be real directories (no link on the way)
    parents = {(root, dest.parent) for root, dest in (layout.root_of(f.path) for f in m.files)}
    for root, p in sorted(parents, key=lambda x: len(x[1].parts)):
        _mkdir(root, p, dir_mode, owner, fix_last=False)
    for oid, loc in layout.tablespaces.items():
        link = layout.pgdata / "pg_tblspc" / oid
        if link.is_symlink() and os.readlink(link) == str(loc):
            continue
        if link.is_symlink() or link.exists():
            remove_path(link)
        os.symlink(loc, link)
        if owner:
            os.lchown(link, *owner)


def clean_for_delta(m: Manifest, layout: Layout) -> int:
    """--delta: remove what the backup does not have (pg_wal contents included). Returns the count.
    In a tablespace location only PG_<major>_<catalog> is cleaned, and only when DIR's own link
    already points there (check_destination refused any other non-empty location)."""
    want_files = {layout.dest(f.path) for f in m.files}
    want_dirs = {layout.dest(d.path) for d in m.directories if d.path != "." and not layout.is_link(d.path)}
    want_dirs |= {layout.pgdata / r for r in REQUIRED_DIRS} | {layout.pgdata / "pg_wal/summaries"}
    want_dirs |= {p for f in want_files for p in f.parents}
    links = {layout.pgdata / "pg_tblspc" / oid for oid in layout.tablespaces}
    keep_root = {layout.pgdata / MARKER}
    auto = layout.pgdata / "postgresql.auto.conf"
    if not auto.is_symlink():
        keep_root.add(auto)  # its non-recovery settings are kept; a link is never read through
    vdir = m.tablespace_version_dir()
    tops = [layout.pgdata]
    for oid, loc in layout.tablespaces.items():
        if vdir and owns_location(layout, oid):
            top = loc / vdir
            if top.is_symlink() or (top.exists() and not top.is_dir()):
                top.unlink()  # inside the location's own version directory name: replaced, not followed
            tops.append(top)
    removed = 0
    for root in tops:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, topdown=False):
            base = Path(dirpath)
            for name in filenames + [n for n in dirnames if (base / n).is_symlink()]:
                p = base / name
                if p in want_files or p in keep_root or p in links:
                    continue
                p.unlink()
                removed += 1
            for name in dirnames:
                p = base / name
                if p.is_symlink() or p in want_dirs or p in links:
                    continue
                if any(p == r for r in tops):
                    continue
                shutil.rmtree(p, ignore_errors=True)
                removed += 1
    return removed
