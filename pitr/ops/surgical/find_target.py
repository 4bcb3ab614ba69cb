"""`pitr find-target`: which transactions deleted, updated, truncated or dropped a table, from archived WAL.

The recipe (docs/find-target.md):
  1. resolve    SCHEMA.TABLE on the running server -> (database OID, relfilenode), or take
                --relfilenode N --db NAME for a table that is gone
  2. window     archived segments that can hold records between --since and --until (by arrival
                time; default: from the newest backup's start)
  3. decode     a thread pool fetches each segment (and the next one, for records that cross the
                boundary) from the repository into a private temp dir and runs pg_waldump of the
                repository's major version on it -- never the server's pg_wal
  4. relate     the table's relfilenodes over time: walking back from the current one, a committed
                transaction that created it and dropped an older file of the database is a
                TRUNCATE (new file left empty) or a rewrite (VACUUM FULL, CLUSTER: pages written);
                a transaction that drops the table's file without creating its successor is a DROP
  5. report     per transaction: xid, commit/abort time and LSN, rows by kind, and the restore
                target just before it (--target-xid XID --target-exclusive)
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pitr.errors import PitrError, PostgresError, UsageError
from pitr.ops.wal import archive
from pitr.pg import waldump, walname
from pitr.repo.catalog import scan_wal
from pitr.repo.manifest import read_manifests
from pitr.repo.meta import read_meta
from pitr.storage.base import Storage

log = logging.getLogger("pitr.find_target")


@dataclass(frozen=True)
class Relation:
    table: str  # as given (or "relfilenode N")
    db: str
    db_oid: int
    relfilenode: int


@dataclass
class Finding:
    xid: int
    status: str  # committed | aborted | unknown (no end record in the window)
    time: str | None
    lsn: str | None
    rows: Counter[str] = field(default_factory=Counter)  # delete, update, hot_update
    kinds: list[str] = field(default_factory=list)  # delete, update, truncate, rewrite, drop

    @property
    def harmless(self) -> bool:
        return self.status == "aborted"

    @property
    def target(self) -> str | None:
        return None if self.harmless else f"--target-xid {self.xid} --target-exclusive"

    def to_json(self) -> dict[str, object]:
        return {"xid": self.xid, "status": self.status, "time": _iso(self.time), "lsn": self.lsn,
                "rows": dict(self.rows), "kinds": self.kinds, "harmless": self.harmless,
                "restore_target": self.target}


@dataclass
class FindResult:
    relation: Relation
    since: datetime | None
    until: datetime | None
    segments: list[str]
    findings: list[Finding]
    seconds: float
    pg_waldump: str
    since_default: bool = False  # the window opened at the newest backup's start (no --since)

    def to_json(self) -> dict[str, object]:
        r = self.relation
        return {"table": r.table, "database": r.db, "database_oid": r.db_oid, "relfilenode": r.relfilenode,
                "since": self.since.isoformat() if self.since else None,
                "until": self.until.isoformat() if self.until else None, "since_default": self.since_default,
                "segments": {"count": len(self.segments), "first": self.segments[0] if self.segments else None,
                             "last": self.segments[-1] if self.segments else None},
                "seconds": round(self.seconds, 3), "pg_waldump": self.pg_waldump,
                "transactions": [f.to_json() for f in self.findings]}


# --------------------------------------------------------------------------- 1. resolve

def split_table(name: str) -> tuple[str, str]:
    """'schema.table' -> (schema, table); a bare name is in public. Quotes are PostgreSQL's."""
    import re

    ident = r'(?:"(?:[^"]|"")+"|[^".\s]+)'
    m = re.fullmatch(rf"\s*(?:({ident})\.)?({ident})\s*", name)
    if not m:
        raise UsageError(f"--table {name!r} is not SCHEMA.TABLE", "e.g. --table public.invoices")

    def unq(s: str) -> str:
        return s[1:-1].replace('""', '"') if s.startswith('"') else s.lower()

    return (unq(m.group(1)) if m.group(1) else "public"), unq(m.group(2))


def _connect(conninfo: str | None, db: str | None) -> object:
    import psycopg

    try:
        info = psycopg.conninfo.make_conninfo(conninfo or "", **({"dbname": db} if db else {}))
        return psycopg.connect(info, autocommit=True, connect_timeout=10, application_name="pitr find-target")
    except psycopg.Error as e:
        first = (str(e).strip().splitlines() or ["connection failed"])[0]
        raise PostgresError(f"cannot connect to PostgreSQL: {first}",
                            "set --dbname CONNINFO (and --db NAME for the table's database)") from None


def current_database(conninfo: str | None) -> str:
    """The database --dbname connects to (the default for --db)."""
    conn = _connect(conninfo, None)
    try:
        return str(conn.execute("select current_database()").fetchone()[0])  # type: ignore[attr-defined]
    finally:
        conn.close()  # type: ignore[attr-defined]


def resolve(conninfo: str | None, table: str | None, db: str | None, relfilenode: int | None) -> Relation:
    """The table's database OID and current relfilenode, asked of the running server."""
    if table is None and relfilenode is None:
        raise UsageError("name the table with --table SCHEMA.TABLE (or --relfilenode N --db NAME when it is gone)")
    if relfilenode is not None and not db:
        raise UsageError("--relfilenode needs --db NAME: the database the table was in")
    conn = _connect(conninfo, db)
    try:
        with conn.cursor() as cur:  # type: ignore[attr-defined]
            if relfilenode is not None:
                cur.execute("select oid from pg_database where datname = current_database()")
                return Relation(table or f"relfilenode {relfilenode}", str(db), int(cur.fetchone()[0]),
                                relfilenode)
            schema, name = split_table(str(table))
            cur.execute("select d.oid, current_database(), pg_relation_filenode(c.oid), c.relkind"
                        " from pg_class c join pg_namespace n on n.oid = c.relnamespace,"
                        " pg_database d where n.nspname = %s and c.relname = %s"
                        " and d.datname = current_database()", (schema, name))
            row = cur.fetchone()
    except Exception as e:  # noqa: BLE001 - psycopg errors: one sentence
        if isinstance(e, PitrError):
            raise
        raise PostgresError(f"PostgreSQL refused the lookup of {table}: {str(e).strip().splitlines()[0]}") from None
    finally:
        conn.close()  # type: ignore[attr-defined]
    if row is None:
        raise UsageError(f"table {schema}.{name} does not exist in database {db or 'of --dbname'}",
                         "a dropped table: pass --relfilenode N --db NAME (its file number before the drop); "
                         "another database: --db NAME")
    if row[3] not in ("r", "m", "p") or row[2] is None:
        raise UsageError(f"{schema}.{name} is not a table with its own storage")
    return Relation(f"{schema}.{name}", str(row[1]), int(row[0]), int(row[2]))


# --------------------------------------------------------------------------- 2. window

def pick_segments(storage: Storage, since: datetime | None,
                  until: datetime | None) -> tuple[list[str], int, datetime | None]:
    """Archived segments (sorted) that may hold records in [since, until]; the segment size; and the
    window's start (--since, or the newest backup's start when not given)."""
    meta = read_meta(storage)
    cat = scan_wal(storage, meta.wal_segment_size)
    if since is None:
        manifests, _bad = read_manifests(storage)
        ours = [m for m in manifests if m.system_identifier == meta.system_identifier]
        if ours:
            newest = max(ours, key=lambda m: walname.parse_lsn(m.stop_lsn))
            since = datetime.fromisoformat(newest.start_time.replace("Z", "+00:00"))
    segs = []
    for name, o in cat.objects.items():
        w = walname.parse(name)
        if w is None or w.kind != "segment":
            continue
        segs.append((walname.segno(name, meta.wal_segment_size), w.timeline, name, o.mtime))
    segs.sort()
    slack = 1.0  # S3 reports arrival in whole seconds
    out = []
    for _segno, _tli, name, mtime in segs:
        if since is not None and mtime + slack < since.timestamp():
            continue  # arrived before the window opened: its records are older
        out.append((name, mtime))
    if until is not None:
        cut = next((i for i, (_n, mt) in enumerate(out) if mt >= until.timestamp()), len(out) - 1)
        out = out[:cut + 1]
    return [n for n, _ in out], meta.wal_segment_size, since


# --------------------------------------------------------------------------- 3. decode

def decode_all(storage: Storage, names: list[str], seg_size: int, bindir: Path, dboid: int, jobs: int,
               progress: Callable[[int, int], None] | None = None) -> list[waldump.SegmentFacts]:
    """Fetch and decode every segment in parallel; results in segment order."""
    meta = read_meta(storage)
    have = set(names)
    tool = bindir / "pg_waldump"
    work = Path(tempfile.mkdtemp(prefix="pitr-find-target-"))
    done = [0]

    def one(i: int, name: str) -> waldump.SegmentFacts:
        d = work / f"s{i}"
        d.mkdir()
        try:
            w = walname.parse(name)
            assert w is not None
            segno = walname.segno(name, seg_size)
            archive.fetch(storage, meta, name, d / name)
            nxt = walname.seg_name(w.timeline, segno + 1, seg_size)
            end = None
            if nxt in have or storage.stat(_wal_key(nxt)) is not None:
                try:
                    archive.fetch(storage, meta, nxt, d / nxt)
                    end = walname.format_lsn((segno + 1) * seg_size)
                except PitrError:
                    end = None
            start = walname.format_lsn(segno * seg_size)
            facts = waldump.decode(tool, d, w.timeline, start, end, dboid)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        done[0] += 1
        if progress:
            progress(done[0], len(names))
        return facts

    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            return list(pool.map(lambda a: one(*a), enumerate(names)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _wal_key(name: str) -> str:
    from pitr.repo.format import wal_key

    return wal_key(name)


# --------------------------------------------------------------------------- 4./5. relate and report

def relate(facts: list[waldump.SegmentFacts], relfilenode: int) -> list[Finding]:
    """The transactions that deleted/updated rows of the table, truncated, rewrote or dropped it."""
    heap: Counter[tuple[int, int, str]] = Counter()
    creates: dict[int, set[int]] = {}
    written: set[tuple[int, int]] = set()
    ends: dict[int, waldump.XactEnd] = {}
    for f in facts:
        heap.update(f.heap)
        for x, rels in f.creates.items():
            creates.setdefault(x, set()).update(rels)
        written |= f.written
        for e in f.ends:
            ends.setdefault(e.xid, e)  # a segment re-read on another timeline repeats records
    top = {s: e.xid for e in ends.values() if e.status == "committed" for s in e.subxacts}
    kinds: dict[int, list[str]] = {}
    chain = {relfilenode}
    todo = [relfilenode]
    while todo:  # walk back through TRUNCATEs and rewrites: who created this file, replacing which?
        r = todo.pop()
        for x, made in creates.items():
            end = ends.get(x)
            if r not in made or end is None or end.status != "committed" or not end.drops:
                continue
            old = min(end.drops)  # the heap is created before its toast table and indexes
            kinds.setdefault(x, []).append("rewrite" if (x, r) in written else "truncate")
            if old not in chain:
                chain.add(old)
                todo.append(old)
    for e in ends.values():
        if e.status == "committed" and e.drops & chain and not (creates.get(e.xid, set()) & chain):
            kinds.setdefault(e.xid, []).append("drop")
    rows: dict[int, Counter[str]] = {}
    for (x, r, kind), n in heap.items():
        if r in chain:
            rows.setdefault(top.get(x, x), Counter())[kind] += n
    out: list[Finding] = []
    for x in sorted(set(rows) | set(kinds)):
        xe = ends.get(x)
        c = rows.get(x, Counter())
        k = [k for k in ("delete", "update") if c.get(k) or (k == "update" and c.get("hot_update"))]
        out.append(Finding(x, xe.status if xe else "unknown", xe.time if xe else None, xe.lsn if xe else None, c,
                           k + sorted(set(kinds.get(x, [])))))
    out.sort(key=lambda t: (t.lsn is None, walname.parse_lsn(t.lsn) if t.lsn else 0, t.xid))
    return out


def merge_timelines(names: list[str], facts: list[waldump.SegmentFacts], seg_size: int) -> list[waldump.SegmentFacts]:
    """One SegmentFacts per segment number: after a promotion the new timeline's first segment
    repeats the old one's records up to the switch, so row counts take the larger, not the sum."""
    by: dict[int, waldump.SegmentFacts] = {}
    for name, f in zip(names, facts, strict=True):
        n = walname.segno(name, seg_size)
        g = by.get(n)
        if g is None:
            by[n] = f
            continue
        for k, v in f.heap.items():
            g.heap[k] = max(g.heap[k], v)
        for x, rels in f.creates.items():
            g.creates.setdefault(x, set()).update(rels)
        g.written |= f.written
        g.ends += f.ends
    return list(by.values())


def in_window(f: Finding, since: datetime | None, until: datetime | None) -> bool:
    t = _parse_pg_time(f.time)
    if t is None:
        return True
    return (since is None or t >= since) and (until is None or t <= until)


def _parse_pg_time(s: str | None) -> datetime | None:
    if not s:
        return None
    text = s.rsplit(" ", 1)[0] if s.endswith(" UTC") else s
    try:
        return datetime.fromisoformat(text).replace(tzinfo=UTC)
    except ValueError:
        return None


def _iso(s: str | None) -> str | None:
    t = _parse_pg_time(s)
    return t.isoformat() if t else s


def find_target(storage: Storage, rel: Relation, since: datetime | None, until: datetime | None, jobs: int,
                pg_bin: str | None, path_env: str | None = None,
                progress: Callable[[int, int], None] | None = None) -> FindResult:
    from pitr.pg.binaries import find_pg_bin

    t0 = time.monotonic()
    meta = read_meta(storage)
    bindir = find_pg_bin(meta.pg_version, pg_bin, path_env or os.environ.get("PATH"))
    names, seg_size, opened = pick_segments(storage, since, until)
    facts = merge_timelines(names, decode_all(storage, names, seg_size, bindir, rel.db_oid, jobs, progress),
                            seg_size)
    found = [f for f in relate(facts, rel.relfilenode) if in_window(f, since, until)]
    res = FindResult(rel, opened, until, names, found, time.monotonic() - t0, str(bindir / "pg_waldump"))
    res.since_default = since is None and opened is not None
    return res
