"""A backup's manifest: the commit point of a backup (written last, deleted first).

Stored at backups/<ID>/manifest as a zstd envelope of UTF-8 JSON. Lists every file with its
size, digest (BLAKE3; SHA-256 in entries older pitr wrote) and where its envelope sits (object key
relative to the backup dir, offset and length inside that object: small files share "bundle"
objects, large ones have their own).
Schema: docs/repository-format.md.

A manifest is untrusted input (anyone who can write to the repository can write one): reading it
ignores unknown fields (the format's evolution rule) and validates every path a restore would
write to (`validate`), so a hostile entry is refused before anything looks at it.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import logging
import posixpath
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from pitr.errors import IntegrityError, NotFoundError
from pitr.repo import envelope
from pitr.repo.format import (
    BACKUP_PREFIX,
    BLAKE3_MANIFEST_FORMAT,
    FORMAT_VERSION,
    MAX_MANIFEST_FORMAT,
    is_backup_id,
    manifest_key,
)
from pitr.storage.base import Storage

log = logging.getLogger("pitr.manifest")

# A manifest is JSON with a SHA-256 per file: it compresses a few-fold, never a hundred-fold. Its
# decoded size is capped in proportion to the stored size (and absolutely), so a planted object
# cannot make `info` or `restore` decompress gigabytes (docs/repository-format.md).
MANIFEST_MAX_SIZE = 1 << 30
MANIFEST_MAX_RATIO = 64


def manifest_cap(stored_size: int) -> int:
    return min(MANIFEST_MAX_SIZE, (64 << 20) + MANIFEST_MAX_RATIO * stored_size)


@dataclass
class FileEntry:
    path: str  # relative to PGDATA ("base/1/1259", "pg_tblspc/16385/PG_15_202209061/5/16386")
    size: int  # raw bytes
    sha256: str  # hex of the raw bytes, for a file stored in a version-1 envelope (older pitr); else ""
    mode: int  # st_mode & 0o7777
    mtime: float
    object: str | None  # key relative to backups/<ID>/ ("data/000003"); None for an empty file
    offset: int = 0  # of the file's envelope inside the object
    length: int = 0  # of the file's envelope
    bad_pages: list[int] = field(default_factory=list)  # blocks whose page checksum failed
    # block-incremental backups (docs/repository-format.md §6.2); absent in older manifests:
    ref: str | None = None  # byte-identical to the entry in backup `ref`, which holds object and map
    map: dict[str, Any] | None = None  # {"object", "offset", "length"}: the envelope of the block map
    sources: list[dict[str, Any]] | None = None  # where the blocks live: see Source; [0] is this entry's own
    # the digest of a file stored in a version-2 envelope (format 5): at most one of sha256 and blake3 is set,
    # neither for an empty file or a block-incremental entry (its block map is its integrity)
    blake3: str = ""

    @property
    def algo(self) -> str:
        """The algorithm of this entry's digest: its envelope's trailer must hold the same one."""
        return "blake3" if self.blake3 else "sha256"

    @property
    def digest(self) -> str:
        """Hex digest of the raw bytes ("" for none: an empty file or a block-incremental entry)."""
        return self.blake3 or self.sha256

    def bind(self, trailer: envelope.Trailer) -> None:
        """Record the digest the entry's envelope trailer holds, in the field of its algorithm
        (restore and verify compare the two: digest_matches)."""
        self.sha256, self.blake3 = (trailer.digest, "") if trailer.algo == "sha256" else ("", trailer.digest)

    def digest_matches(self, trailer: envelope.Trailer) -> bool:
        """The trailer describes exactly this entry's bytes, with the entry's own algorithm."""
        return trailer.matches(self.algo, self.digest, self.size)


SOURCE_KINDS = ("file", "blocks")


@dataclass(frozen=True)
class Source:
    """One item of FileEntry.sources: an envelope holding some of a file's blocks, in backups/<backup>/.
    kind "file": a whole file (block b at byte b*BS); "blocks": changed blocks in increasing order
    (ordinal k at byte k*BS). object None: a "blocks" source with no block in it."""

    backup: str
    object: str | None
    offset: int
    length: int
    kind: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def sources_of(e: FileEntry) -> list[Source]:
    """An entry's sources as objects (already validated by Manifest.problem when read)."""
    return [Source(s["backup"], s.get("object"), s.get("offset", 0), s.get("length", 0), s["kind"])
            for s in (e.sources or [])]


@dataclass
class DirEntry:
    path: str
    mode: int


@dataclass
class Tablespace:
    oid: str
    location: str  # absolute path on the source host


@dataclass
class Manifest:
    id: str
    type: str  # "full" | "diff" | "incr"
    system_identifier: int
    pg_version: int  # major
    pg_version_num: int
    wal_segment_size: int
    timeline: int
    start_lsn: str
    stop_lsn: str
    start_wal: str
    stop_wal: str
    start_time: str  # ISO-8601 UTC
    stop_time: str  # ISO-8601 UTC: when pg_backup_stop returned (the consistent point is at or before)
    compress: str
    backup_label: str
    tablespace_map: str | None
    checksums_enabled: bool
    files: list[FileEntry]
    directories: list[DirEntry]
    tablespaces: list[Tablespace] = field(default_factory=list)
    bytes: int = 0  # raw total
    stored_bytes: int = 0
    duration: float = 0.0
    pitr_version: str = ""
    parent: str | None = None  # diff/incr: the ID of the backup this one builds on
    format: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> builtins.bytes:  # `bytes` is a field name here
        d = asdict(self)
        d["system_identifier"] = str(self.system_identifier)
        return json.dumps(d, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: builtins.bytes, what: str = "manifest") -> Manifest:
        try:
            d = json.loads(data)
            if int(d.get("format", 0)) > MAX_MANIFEST_FORMAT:
                raise IntegrityError(f"{what} uses format {d['format']}; this pitr reads up to {MAX_MANIFEST_FORMAT}",
                                     "upgrade pitr")
            d["system_identifier"] = int(d["system_identifier"])
            d["files"] = [_known(FileEntry, f) for f in d["files"]]
            d["directories"] = [_known(DirEntry, x) for x in d["directories"]]
            d["tablespaces"] = [_known(Tablespace, t) for t in d.get("tablespaces", [])]
            m = _known(cls, d)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise IntegrityError(f"{what} is malformed: {e}") from None
        bad = m.problem()
        if bad:
            raise IntegrityError(f"{what} is unsafe to use: {bad}",
                                 "a manifest pitr did not write, or a damaged one; restore another backup "
                                 "with --backup and check who can write to the repository")
        return m

    def problem(self) -> str | None:
        """Why a restore must not follow this manifest (paths that leave their root, duplicates,
        bad tablespace OIDs or locations), or None. The rules: docs/repository-format.md §6.2."""
        oids: set[str] = set()
        locs: list[str] = []
        for t in self.tablespaces:
            if not isinstance(t.oid, str) or not t.oid.isdigit() or not t.oid.isascii() or t.oid in oids:
                return f"tablespace OID {t.oid!r} is not a (unique) decimal number"
            oids.add(t.oid)
            why = location_problem(t.location)
            if why:
                return f"tablespace {t.oid} has the location {t.location!r}, which {why}"
            locs.append(t.location)
        if self.tablespace_map is not None and not isinstance(self.tablespace_map, str):
            return "its tablespace_map is not a string"
        # restored into DIR/tablespace_map, from which PostgreSQL makes pg_tblspc links: every line
        # must name a tablespace the restore knows (and remaps), with a safe location
        for line in (self.tablespace_map or "").splitlines():
            if not line.strip():
                continue
            oid, _, loc = line.partition(" ")
            if not oid.isdigit() or not oid.isascii():
                return f"its tablespace_map line {line!r} does not start with a tablespace OID"
            if self.tablespaces:
                if oid not in oids:
                    return f"its tablespace_map names tablespace {oid}, which is not among its tablespaces"
                continue
            why = location_problem(loc)
            if why:
                return f"tablespace_map gives tablespace {oid} the location {loc!r}, which {why}"
            oids.add(oid)
            locs.append(loc)
        for a in locs:
            for b in locs:
                if a is not b and (a == b or b.startswith(a + "/")):
                    return f"tablespace locations {a!r} and {b!r} overlap"
        dirs: set[str] = set()
        vdirs: set[str] = set()
        inplace = {x.path.split("/")[1] for x in self.directories
                   if isinstance(x.path, str) and x.path.count("/") == 1 and x.path.startswith("pg_tblspc/")}
        oids_in = (oids, inplace)
        for x in self.directories:
            if x.path == ".":  # the data directory itself (its mode)
                continue
            why = path_problem(x.path) or _tablespace_problem(x.path, oids_in, vdirs, False)
            if why or x.path in dirs:
                return f"directory entry {x.path!r} {why or 'is listed twice'}"
            if not isinstance(x.mode, int) or x.mode < 0:
                return f"directory entry {x.path!r} has a mode that is not a whole number"
            dirs.add(x.path)
        files: set[str] = set()
        for f in self.files:
            why = path_problem(f.path) or _tablespace_problem(f.path, oids_in, vdirs, True)
            if why or f.path in files or f.path in dirs:
                return f"file entry {f.path!r} {why or 'is listed twice'}"
            files.add(f.path)
            if not all(isinstance(v, int) and v >= 0 for v in (f.size, f.mode, f.offset, f.length)):
                return f"file entry {f.path!r} has a size, mode, offset or length that is not a whole number"
            if f.object is not None and (not isinstance(f.object, str) or path_problem(f.object)):
                return f"file entry {f.path!r} names the object {f.object!r}, which is not a relative key"
            why = self._digest_problem(f)
            if why:
                return f"file entry {f.path!r} {why}"
            why = self._incr_problem(f)
            if why:
                return f"file entry {f.path!r} {why}"
        # a parent is an older backup's ID (IDs sort by time), like ref and sources: a chain walk then
        # only goes back in time, and a hostile parent is refused here rather than followed
        if self.parent is not None and (not is_backup_id(self.parent) or self.parent >= self.id):
            return f"its parent {self.parent!r} is not the ID of an older backup"
        if len(vdirs) > 1:
            return f"its tablespaces have different version directories ({', '.join(sorted(vdirs))})"
        return None

    def _digest_problem(self, f: FileEntry) -> str | None:
        """sha256 and blake3: "" or 64 lower-case hex digits, not both; blake3 only in format 5 or later."""
        for name in ("sha256", "blake3"):
            v = getattr(f, name)
            if not isinstance(v, str) or (v and not _SHA256_HEX.fullmatch(v)):
                return f"has a {name} digest that is not 64 lower-case hex digits"
        if f.sha256 and f.blake3:
            return "has both a sha256 and a blake3 digest"
        if f.blake3 and (not isinstance(self.format, int) or self.format < BLAKE3_MANIFEST_FORMAT):
            return f"has a blake3 digest in a manifest of format {self.format} (blake3 needs format " \
                   f"{BLAKE3_MANIFEST_FORMAT})"
        return None

    def _incr_problem(self, f: FileEntry) -> str | None:
        """ref, map and sources: backup IDs of this or older backups, keys in normal form, whole
        numbers, and sources[0] the entry's own object (the rules: docs/repository-format.md §6.2)."""
        if f.ref is not None and (not is_backup_id(f.ref) or f.ref >= self.id):
            return f"refers to {f.ref!r}, which is not the ID of an older backup"
        if f.map is not None:
            why = _location_problem(f.map, True)
            if why:
                return f"has a block map location that {why}"
            why = _map_binding_problem(f, f.ref or self.id)
            if why:
                return why
        if f.sources is None:
            return None
        if not isinstance(f.sources, list) or not f.sources or len(f.sources) > 1 << 16:
            return "has a sources list that is not a non-empty list"
        if f.map is None:
            return "has sources but no block map"
        home = f.ref or self.id
        for i, s in enumerate(f.sources):
            if not isinstance(s, dict):
                return f"has source {i} that is not an object"
            b = s.get("backup")
            if not isinstance(b, str) or not is_backup_id(b) or b > home:
                return f"has source {i} naming the backup {b!r}, which is not this or an older backup's ID"
            if s.get("kind") not in SOURCE_KINDS:
                return f"has source {i} of an unknown kind {s.get('kind')!r}"
            why = _location_problem(s, i == 0 and s.get("kind") == "blocks")
            if why:
                return f"has source {i} whose location {why}"
        first = f.sources[0]
        if first.get("kind") != "blocks" or first.get("backup") != home:
            return "has a first source that is not its own changed blocks"
        if (first.get("object"), first.get("offset", 0), first.get("length", 0)) != (f.object, f.offset, f.length):
            return "has a first source that does not match its object, offset and length"
        return None

    def tablespace_version_dir(self) -> str | None:
        """PG_<major>_<catalog>: the one directory of each tablespace location this cluster owns."""
        for path in [d.path for d in self.directories] + [f.path for f in self.files]:
            parts = path.split("/")
            if len(parts) >= 3 and parts[0] == "pg_tblspc" and _VERSION_DIR.fullmatch(parts[2]):
                return parts[2]
        return None


_VERSION_DIR = re.compile(r"PG_[0-9.]+_[0-9]+")


def _tablespace_problem(path: str, oids: tuple[set[str], set[str]], vdirs: set[str], is_file: bool) -> str | None:
    """An entry under pg_tblspc/<oid>/ must be in a tablespace of the backup, and in a linked one,
    inside its version directory (a restore owns nothing else in a location)."""
    parts = path.split("/")
    if parts[0] != "pg_tblspc" or len(parts) < 2:
        return None
    if len(parts) == 2:
        return "is a file in pg_tblspc/" if is_file else None  # an in-place tablespace's directory
    linked, inplace = oids
    if parts[1] not in linked:
        if parts[1] in inplace:
            return None  # an in-place tablespace: inside the data directory
        return "is under pg_tblspc/ but names no tablespace of the backup"
    if not _VERSION_DIR.fullmatch(parts[2]) or (is_file and len(parts) == 3):
        return "is not inside the tablespace's PG_<version>_<catalog> directory"
    vdirs.add(parts[2])
    return None


def _location_problem(d: object, may_be_empty: bool) -> str | None:
    """{"object", "offset", "length"} with a relative key in normal form and whole numbers."""
    if not isinstance(d, dict):
        return "is not an object"
    obj = d.get("object")
    if obj is None and may_be_empty:
        pass
    elif not isinstance(obj, str) or path_problem(obj):
        return f"names the object {obj!r}, which is not a relative key"
    if not all(isinstance(d.get(k, 0), int) and not isinstance(d.get(k, 0), bool) and d.get(k, 0) >= 0
               for k in ("offset", "length")):
        return "has an offset or length that is not a whole number"
    return None


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _map_binding_problem(f: FileEntry, home: str) -> str | None:
    """map.sha256 (format 2) is 64 lower-case hex digits; map.base, only on a block-incremental
    entry's format-2 map, is an older backup's ID (docs/repository-format.md §6.2.1)."""
    assert f.map is not None
    sha, base = f.map.get("sha256"), f.map.get("base")
    if sha is not None and (not isinstance(sha, str) or not _SHA256_HEX.fullmatch(sha)):
        return "has a block map SHA-256 that is not 64 hex digits"
    if base is not None and (sha is None or f.sources is None or not is_backup_id(base) or base >= home):
        return f"has a block map whose base {base!r} is not an older backup's ID (with a SHA-256 and sources)"
    return None


def _known(cls: Any, d: dict[str, Any]) -> Any:
    """cls(**d) without the fields this version does not know (a newer writer's additions)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def path_problem(p: object) -> str | None:
    """Why p is not a safe relative path (what it is not), or None."""
    if not isinstance(p, str):
        return "is not a string"
    if not p:
        return "is empty"
    if "\0" in p:
        return "contains a NUL byte"
    if p.startswith("/"):
        return "is absolute"
    if ".." in p.split("/"):
        return "contains '..'"
    if posixpath.normpath(p) != p:
        return "is not in normal form (no '.', '//' or trailing '/')"
    return None


def location_problem(p: object) -> str | None:
    """Why p is not an acceptable tablespace location (what it is not), or None."""
    if not isinstance(p, str) or not p:
        return "is empty"
    if "\0" in p:
        return "contains a NUL byte"
    if not p.startswith("/"):
        return "is not absolute"
    if p.startswith("//") or posixpath.normpath(p) != p or ".." in p.split("/"):
        return "is not in normal form"
    if p == "/":
        return "is the root directory"
    return None


def write_manifest(storage: Storage, m: Manifest) -> None:
    """The commit point: call only after every data object is durably stored."""
    storage.put(manifest_key(m.id), envelope.encode(m.to_json(), envelope.Codec("zstd", 3)))


def read_manifest(storage: Storage, backup_id: str) -> Manifest:
    key = manifest_key(backup_id)
    try:
        stored = storage.get(key, max_size=MANIFEST_MAX_SIZE)
        raw = envelope.decode(stored, f"manifest of backup {backup_id}", max_size=manifest_cap(len(stored)))
    except NotFoundError:
        raise NotFoundError(f"backup {backup_id} does not exist in {storage.display}",
                            "list the backups with `pitr info`") from None
    m = Manifest.from_json(raw, f"manifest of backup {backup_id}")
    if m.id != backup_id:  # its objects are read under backups/<id>/: it must be this directory's
        raise IntegrityError(f"manifest of backup {backup_id} is unsafe to use: it names itself {m.id!r}",
                             "a manifest copied from another backup or written by hand; restore another backup")
    return m


def list_backup_ids(storage: Storage) -> list[str]:
    """IDs of complete backups (those with a manifest), oldest first (IDs sort by time)."""
    ids = []
    for o in storage.list(BACKUP_PREFIX):
        parts = o.key.split("/")
        if len(parts) == 3 and parts[2] == "manifest":
            ids.append(parts[1])
    return sorted(ids)


def read_manifests(storage: Storage) -> tuple[list[Manifest], dict[str, IntegrityError]]:
    """Every complete backup's manifest, oldest first, and the unreadable ones apart (by ID):
    one damaged or hostile manifest must not make every other backup unusable."""
    good: list[Manifest] = []
    bad: dict[str, IntegrityError] = {}
    for i in list_backup_ids(storage):
        try:
            good.append(read_manifest(storage, i))
        except IntegrityError as e:
            bad[i] = e
        except NotFoundError:
            continue  # expired between the listing and the read
    return good, bad


def list_manifests(storage: Storage) -> list[Manifest]:
    """The readable manifests, oldest first; each unreadable one is skipped with a warning."""
    good, bad = read_manifests(storage)
    for i, e in bad.items():
        log.warning("skipping backup %s: %s", i, e)
    return good
