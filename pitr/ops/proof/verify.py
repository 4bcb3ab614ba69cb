"""`pitr verify`: re-read every stored object and check that the repository hangs together.

Read-only. One listing of wal/ and one of backups/, then:
1. objects: every WAL object and every backup data object is streamed through the envelope
   decoder (size + digest) by `jobs` threads, CHUNK bytes at a time, so memory stays bounded
   whatever the object size. A WAL segment's first page header is compared with its name and
   the repository's cluster; each file a manifest lists is compared (size, digest) with the
   envelope at its object/offset/length.
2. manifests: each backup's manifest against the objects under its directory (missing, extra)
   and against the repository metadata (cluster, segment size).
3. continuity: every segment from each backup's start to the archive's head, on every timeline
   the backup leads to, is archived; a timeline > 1 that has segments has its .history file.

With a backup ID, only that backup and the WAL it needs (plus the .history files) are read.

verify reads as its recipe, one function per step sharing one _Run: _list_backups, _read_manifests
(2), _judge_chains, _list_wal, _wal_to_read, _judge_continuity (3), _read_objects (1: WAL objects,
block maps, backup data objects, by `jobs` threads), _finish (count, sort).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

from pitr.errors import IntegrityError, NotFoundError
from pitr.ops.proof.verify_blocks import (
    BAD_BLOCK,
    BLOCK_MAP,
    CHAIN,
    BlockSink,
    MapOutcome,
    Piece,
    Work,
    by_path,
    collect,
    expect_blocks,
    own_keys,
    read_maps,
)
from pitr.ops.wal.walreach import Histories, backup_needs, load_histories
from pitr.pg import walheader, walname
from pitr.repo import envelope
from pitr.repo.catalog import WalCatalog, scan_wal
from pitr.repo.chain import chain_problems, dependencies
from pitr.repo.format import BACKUP_PREFIX, HISTORY_PREFIX, META_KEY, WAL_PREFIX, backup_dir, manifest_key, wal_key
from pitr.repo.manifest import Manifest, read_manifest
from pitr.repo.meta import RepoMeta, read_meta
from pitr.storage.base import ObjectInfo, Storage

log = logging.getLogger("pitr.verify")

EMPTY_DIGESTS = {a: envelope.digest_of(a, b"").hex() for a in ("sha256", "blake3")}  # an empty file's trailer
HEAD_KEEP = 8192  # decoded bytes kept of a WAL object: the first page (header + zero check)
HISTORY_MAX = 1 << 20
# objects of a backup directory that are not data: the manifest, and the in-progress marker
# `pitr backup` writes first and removes (best effort) after the manifest
BACKUP_MARKERS = ("manifest", "started")  # a .history file is a few lines; keep this much to parse it

# problem kinds (docs/maintenance.md)
CORRUPT = "corrupt"  # an envelope does not decode or fails its checksum
WAL_HEADER = "wal-header"  # a segment's page header disagrees with its name, size or cluster
WAL_MISSING = "wal-missing"  # a segment some backup needs is not archived
HISTORY_MISSING = "history-missing"  # a timeline > 1 has segments but no .history file
OBJECT_MISSING = "object-missing"  # a manifest names an object that is not stored
FILE_MISMATCH = "file-mismatch"  # an envelope decodes but not to the size/digest the manifest says
EXTRA = "extra"  # an object under a backup's directory that its manifest does not reference
MANIFEST = "manifest"  # a manifest that is unreadable or disagrees with the repository
MISPLACED = "misplaced"  # a WAL object under a key other than the one its name maps to
EMPTY = "empty"  # no backup and no WAL at all: nothing could be restored, which is not "OK"
TAMPERED = "tampered"  # a write-once object whose current version is not the one pitr wrote (versioned S3)


@dataclass(frozen=True)
class Problem:
    kind: str
    object: str  # the repository key it concerns
    detail: str


@dataclass
class Checked:
    backups: int = 0
    backup_objects: int = 0
    files: int = 0
    wal_segments: int = 0
    wal_other: int = 0  # .history, .backup, .partial
    timelines: int = 0
    bytes: int = 0  # stored bytes read


@dataclass
class VerifyResult:
    problems: list[Problem] = field(default_factory=list)
    checked: Checked = field(default_factory=Checked)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, object]:
        return {"ok": self.ok, "problems": [asdict(p) for p in self.problems], "checked": asdict(self.checked)}


# --------------------------------------------------------------------------- streams

class _Counting:
    """Counts the bytes read through it (the stored bytes verify reads)."""

    def __init__(self, src: BinaryIO) -> None:
        self.src = src
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        b = self.src.read(n)
        self.count += len(b)
        return b


class _Window:
    """At most `length` bytes of src; drain() consumes what decoding left unread."""

    def __init__(self, src: _Counting, length: int) -> None:
        self.src = src
        self.left = length

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        b = self.src.read(self.left if n < 0 else min(n, self.left))
        self.left -= len(b)
        return b

    def drain(self) -> bool:
        """Consume the rest of the window; False when src ended before it."""
        while self.left > 0:
            if not self.read(envelope.CHUNK):
                return False
        return True


class _HeadSink:
    """A write() target keeping only the first `keep` bytes (and counting the rest)."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.head = bytearray()

    def write(self, b: bytes) -> int:
        room = self.keep - len(self.head)
        if room > 0:
            self.head += b[:room]
        return len(b)


def _skip(src: _Counting, n: int) -> bool:
    while n > 0:
        b = src.read(min(n, envelope.CHUNK))
        if not b:
            return False
        n -= len(b)
    return True


# --------------------------------------------------------------------------- object checks

@dataclass
class _Outcome:
    problems: list[Problem] = field(default_factory=list)
    bytes: int = 0
    files: int = 0


def check_wal_object(storage: Storage, info: ObjectInfo, meta: RepoMeta) -> _Outcome:
    """Decode one archived WAL object; check a segment's header, a .history file's syntax."""
    out = _Outcome()
    name = info.key.rsplit("/", 1)[-1]
    w = walname.parse(name)
    assert w is not None
    try:
        src = _Counting(storage.open(info.key))
    except NotFoundError:
        out.problems.append(Problem(OBJECT_MISSING, info.key, "was listed but is gone (deleted while verifying?)"))
        return out
    sink = _HeadSink(HISTORY_MAX if w.kind == "history" else HEAD_KEEP)
    try:
        with src.src:
            t = envelope.decode_stream(src, sink, f"archived {name}",  # type: ignore[arg-type]
                                       max_size=walname.max_size(w.kind, meta.wal_segment_size))
    except IntegrityError as e:
        out.problems.append(Problem(CORRUPT, info.key, str(e)))
        return out
    finally:
        out.bytes = src.count
    head = bytes(sink.head)
    if w.kind in ("segment", "partial"):
        why = walheader.problem(w.segment or name, head, meta.wal_segment_size, meta.system_identifier, t.size)
        if why:
            out.problems.append(Problem(WAL_HEADER, info.key, f"{name} {why}"))
    elif w.kind == "history":
        try:
            entries = walname.parse_history(head.decode())
        except (UnicodeDecodeError, ValueError) as e:
            out.problems.append(Problem(CORRUPT, info.key, f"{name} is not a timeline history file: {e}"))
        else:
            if any(h.parent >= w.timeline for h in entries):
                out.problems.append(Problem(CORRUPT, info.key, f"{name} names a parent timeline not older than itself"))
    return out


def check_data_object(storage: Storage, key: str, pieces: list[Piece]) -> _Outcome:
    """Stream one backup data object once, decoding each piece's envelope in offset order: a file
    stored whole against its size and digest, and the blocks block maps expect against their hashes."""
    out = _Outcome()
    pieces = sorted(pieces, key=lambda e: (e.offset, e.length))
    try:
        raw = storage.open(key)
    except NotFoundError:
        out.problems.append(Problem(OBJECT_MISSING, key, "was listed but is gone (deleted while verifying?)"))
        return out
    src = _Counting(raw)
    pos = 0
    try:
        with raw:
            for i, e in enumerate(pieces):
                if e.offset < pos:
                    out.problems.append(Problem(MANIFEST, key, f"the envelope of {e.path} at offset {e.offset} "
                                                           f"overlaps the previous file's"))
                    continue
                if not _skip(src, e.offset - pos):
                    out.problems.append(_truncated(key, src.count, pieces[i:]))
                    return out
                win = _Window(src, e.length)
                what = f"the envelope of {e.path} at offset {e.offset}"
                sink = BlockSink(e) if e.blocks else None
                try:
                    t = envelope.decode_stream(win, sink, what, max_size=e.size)  # type: ignore[arg-type]
                except IntegrityError as err:
                    out.problems.append(Problem(CORRUPT, key, str(err)))
                    t = None
                if not win.drain():
                    if t is None:
                        out.problems.pop()  # the cut is the real story, not the decode error
                    out.problems.append(_truncated(key, src.count, pieces[i:]))
                    return out
                pos = e.offset + e.length
                out.files += e.file
                if t is not None and e.exact:
                    want = e.digest or (EMPTY_DIGESTS[e.algo] if e.file_size == 0 else "")
                    if not t.matches(e.algo, want, e.file_size):
                        out.problems.append(Problem(
                            FILE_MISMATCH, key,
                            f"file {e.path} decodes to {t.size} bytes ({t.algo} {t.digest[:16]}…), the manifest says "
                            f"{e.file_size} bytes ({e.algo} {(e.digest or '-')[:16]}…)"))
                if t is not None and sink is not None:
                    out.problems.extend(_block_problems(key, e, sink))
    except IntegrityError as err:  # an encrypted object failing authentication while skipped or drained
        if not out.problems or out.problems[-1].detail != str(err):
            out.problems.append(Problem(CORRUPT, key, str(err)))
    finally:
        out.bytes = src.count
    return out


def _block_problems(key: str, e: Piece, sink: BlockSink) -> list[Problem]:
    """One problem per backup file whose blocks fail (the first few blocks named)."""
    out = []
    for why, items in (("does not match its hash in the block map", sink.bad),
                       ("is not in the envelope (it holds fewer blocks)", sink.missing())):
        by_file: dict[str, list[int]] = {}
        for block, label in items:
            by_file.setdefault(label, []).append(block)
        for whose, blocks in sorted(by_file.items()):
            shown = ", ".join(map(str, blocks[:5])) + (f" and {len(blocks) - 5} more" if len(blocks) > 5 else "")
            out.append(Problem(BAD_BLOCK, key, f"block{'s' if len(blocks) > 1 else ''} {shown} of {whose} "
                                               f"(envelope at offset {e.offset}) {why}"))
    return out


def _truncated(key: str, size: int, rest: list[Piece]) -> Problem:
    more = f" and {len(rest) - 1} more" if len(rest) > 1 else ""
    return Problem(CORRUPT, key, f"is truncated: it ends at byte {size}, before the end of the envelope of "
                                 f"{rest[0].path} (offset {rest[0].offset}, {rest[0].length} bytes){more}")


# --------------------------------------------------------------------------- manifests

def manifest_problems(m: Manifest, meta: RepoMeta, stored: dict[str, ObjectInfo]) -> list[Problem]:
    """A manifest against the repository: cluster, entries without data, objects under its
    directory that nothing references (missing objects: see verify_blocks.Work.needed_by)."""
    mkey = manifest_key(m.id)
    problems: list[Problem] = []
    if m.system_identifier != meta.system_identifier:
        problems.append(Problem(MANIFEST, mkey, f"backup {m.id} is of the cluster {m.system_identifier}, "
                                                f"the repository's is {meta.system_identifier}"))
    if m.wal_segment_size != meta.wal_segment_size:
        problems.append(Problem(MANIFEST, mkey, f"backup {m.id} has WAL segments of {m.wal_segment_size} bytes, "
                                                f"the repository's are {meta.wal_segment_size}"))
    for lsn in (m.start_lsn, m.stop_lsn):
        try:
            walname.parse_lsn(lsn)
        except ValueError:
            problems.append(Problem(MANIFEST, mkey, f"backup {m.id} has an invalid LSN {lsn!r}"))
    for e in m.files:
        if e.object is None and e.size != 0 and e.sources is None:
            problems.append(Problem(MANIFEST, mkey, f"file {e.path} is {e.size} bytes but has no object"))
    base = backup_dir(m.id)
    referenced = own_keys(m) | {base + name for name in BACKUP_MARKERS}
    for key in sorted(stored):
        if key not in referenced:
            problems.append(Problem(EXTRA, key, f"is under backup {m.id} but its manifest does not reference it"))
    return problems


# --------------------------------------------------------------------------- continuity

def continuity_problems(manifests: list[Manifest], cat: WalCatalog, histories: Histories) -> list[Problem]:
    """Missing .history files and segments the backups need, one problem per missing run of
    consecutive segments (with no backups: holes inside each timeline's archived range)."""
    problems: list[Problem] = []
    for tli, tl in sorted(cat.timelines.items()):
        if tli > 1 and tl.segnos and tli not in cat.history_files:
            problems.append(Problem(HISTORY_MISSING, wal_key(walname.history_name(tli)),
                                    f"timeline {tli} has archived segments but no history file, so no restore "
                                    f"can follow it"))
    have = {tli: set(tl.segnos) for tli, tl in cat.timelines.items()}
    # (timeline, segno) -> (ids of the backups needing it, needed for consistency)
    missing: dict[tuple[int, int], tuple[list[str], bool]] = {}
    for m in manifests:
        try:
            needs = backup_needs(m, cat, histories)
        except ValueError:
            continue  # invalid LSNs: reported as a manifest problem
        for n in needs:
            got = have.get(n.timeline, set())
            for s in range(n.first, n.last + 1):
                if s in got:
                    continue
                ids, cons = missing.get((n.timeline, s), ([], False))
                if m.id not in ids:
                    ids.append(m.id)
                cons = cons or (n.consistent_upto is not None and s <= n.consistent_upto)
                missing[(n.timeline, s)] = (ids, cons)
    if not manifests:
        for tli, tl in cat.timelines.items():
            for a, b in tl.gaps():
                for s in range(a, b + 1):
                    missing[(tli, s)] = ([], False)
    problems.extend(_missing_runs(missing, cat))
    return problems


def _missing_runs(missing: dict[tuple[int, int], tuple[list[str], bool]], cat: WalCatalog) -> list[Problem]:
    out: list[Problem] = []
    run: list[tuple[int, int]] = []

    def flush() -> None:
        if not run:
            return
        tli, first = run[0]
        last = run[-1][1]
        ids = sorted({i for s in run for i in missing[(tli, s[1])][0]})
        consistent = any(missing[(tli, s[1])][1] for s in run)
        first_name = cat.seg_name(tli, first)
        count = last - first + 1
        span = first_name if count == 1 else f"{first_name} to {cat.seg_name(tli, last)} ({count} segments)"
        if ids:
            why = "to become consistent" if consistent else "to reach the archive's head"
            who = f"; backup{'s' if len(ids) > 1 else ''} {', '.join(ids)} need{'' if len(ids) > 1 else 's'} it {why}"
        else:
            who = "; a hole inside the archived WAL of this timeline"
        out.append(Problem(WAL_MISSING, wal_key(first_name), f"missing {span} on timeline {tli}{who}"))
        run.clear()

    for tli, s in sorted(missing):
        if run and (run[-1][0] != tli or run[-1][1] + 1 != s):
            flush()
        run.append((tli, s))
    flush()
    return out


# --------------------------------------------------------------------------- the operation

@dataclass(frozen=True)
class VerifyOptions:
    backup_id: str | None = None
    jobs: int = 2


@dataclass
class _Run:
    """What the phases of one verify share; filled in as the recipe goes."""

    storage: Storage
    opts: VerifyOptions
    meta: RepoMeta
    say: Callable[[str], None]
    res: VerifyResult = field(default_factory=VerifyResult)
    by_backup: dict[str, dict[str, ObjectInfo]] = field(default_factory=dict)  # id -> objects under backups/<id>/
    stored: set[str] = field(default_factory=set)  # every key under backups/
    all_ids: list[str] = field(default_factory=list)  # the backups with a manifest
    ids: list[str] = field(default_factory=list)  # the backups to verify
    manifests: list[Manifest] = field(default_factory=list)  # theirs, readable
    unreadable: set[str] = field(default_factory=set)
    by_id: dict[str, Manifest] = field(default_factory=dict)  # + the manifests a single backup depends on


def verify(storage: Storage, opts: VerifyOptions, progress: Callable[[str], None] | None = None) -> VerifyResult:
    """Check the repository; never writes. Raises only when it cannot look at all (metadata
    missing, storage unreachable, an unknown --backup ID)."""
    run = _Run(storage, opts, read_meta(storage), progress or (lambda _msg: None))
    _list_backups(run)
    _read_manifests(run)
    work = _judge_chains(run)
    cat, histories = _list_wal(run)
    wal_objects = _wal_to_read(run, cat, histories)
    _judge_continuity(run, cat, histories)
    _read_objects(run, work, wal_objects)
    return _finish(run, work)


def _list_backups(run: _Run) -> None:
    """One listing of backups/: manifests and the objects under each backup directory."""
    for o in run.storage.list(BACKUP_PREFIX):
        parts = o.key.split("/")
        if len(parts) >= 3:
            run.by_backup.setdefault(parts[1], {})[o.key] = o
    run.stored = {k for objs in run.by_backup.values() for k in objs}
    run.ids = run.all_ids = sorted(i for i, objs in run.by_backup.items() if manifest_key(i) in objs)
    if run.opts.backup_id is not None:
        if run.opts.backup_id not in run.ids:
            raise NotFoundError(f"backup {run.opts.backup_id} does not exist in {run.storage.display}",
                                "list the backups with `pitr info`")
        run.ids = [run.opts.backup_id]


def _read_manifests(run: _Run) -> None:
    """Phase 2: each manifest against the repository (and, for one backup, the manifests it depends on)."""
    for bid in run.ids:
        try:
            m = read_manifest(run.storage, bid)
        except IntegrityError as e:
            run.res.problems.append(Problem(MANIFEST, manifest_key(bid), str(e)))
            run.unreadable.add(bid)
            continue
        except NotFoundError:
            continue  # expired while we looked
        run.manifests.append(m)
        run.res.problems.extend(manifest_problems(m, run.meta, run.by_backup.get(bid, {})))
    run.res.checked.backups = len(run.ids)
    run.by_id = {m.id: m for m in run.manifests}
    if run.opts.backup_id is not None and run.manifests:
        _read_dependencies(run.storage, run.manifests[0], set(run.all_ids), run.by_id, run.unreadable)


def _judge_chains(run: _Run) -> Work:
    """Broken diff/incr chains; what each manifest's entries need read (verify_blocks.Work)."""
    broken = chain_problems(list(run.by_id.values()), run.unreadable)
    run.res.problems.extend(Problem(CHAIN, manifest_key(m.id), broken[m.id].reason)
                            for m in run.manifests if m.id in broken)
    work = Work(known=set(run.by_id))
    for m in run.manifests:
        collect(m, run.by_id, work)
    run.res.problems.extend(Problem(MANIFEST, manifest_key(b), d) for b, d in work.manifest_problems)
    return work


def _list_wal(run: _Run) -> tuple[WalCatalog, Histories]:
    """One listing of wal/ and its history files; WAL objects under a key wal-fetch would not look at."""
    cat = scan_wal(run.storage, run.meta.wal_segment_size)
    histories = load_histories(run.storage, cat)
    run.res.checked.timelines = len(set(cat.timelines) | set(cat.history_files))
    for name, info in sorted(cat.objects.items()):
        if info.key != wal_key(name):
            run.res.problems.append(Problem(MISPLACED, info.key, f"{name} belongs under {wal_key(name)}; "
                                                                 f"wal-fetch will not find it"))
    return cat, histories


def _wal_to_read(run: _Run, cat: WalCatalog, histories: Histories) -> list[ObjectInfo]:
    """Every WAL object; with a backup ID, the segments that backup needs and the history files."""
    if run.opts.backup_id is None:
        return [o for _n, o in sorted(cat.objects.items())]
    needs = backup_needs(run.manifests[0], cat, histories) if run.manifests else []
    wanted = {cat.seg_name(n.timeline, s) for n in needs for s in range(n.first, n.last + 1)}
    wanted |= {walname.history_name(t) for t in cat.history_files}
    return [cat.objects[n] for n in sorted(wanted) if n in cat.objects]


def _judge_continuity(run: _Run, cat: WalCatalog, histories: Histories) -> None:
    """Phase 3, from the listings alone: missing WAL and history files, rewritten objects, an empty repository."""
    run.res.problems.extend(continuity_problems(run.manifests, cat, histories))
    if run.opts.backup_id is None:
        run.res.problems.extend(tamper_problems(run.storage))
    if not run.ids and not cat.objects:
        run.res.problems.append(Problem(EMPTY, META_KEY, "the repository holds no backup and no archived WAL, so "
                                                         "nothing can be restored from it (run `pitr backup`)"))


def _read_objects(run: _Run, work: Work, wal_objects: list[ObjectInfo]) -> None:
    """Phase 1: decode every object to check by `jobs` threads; block maps first (small), since they say
    which blocks of which envelopes to check."""
    pool = ThreadPoolExecutor(max_workers=max(1, run.opts.jobs), thread_name_prefix="pitr-verify")
    try:
        wal_futs = [pool.submit(check_wal_object, run.storage, o, run.meta) for o in wal_objects]
        _read_block_maps(run, work, pool)
        _report_missing_objects(run, work)
        data_tasks = sorted((k, list(ps.values())) for k, ps in work.pieces.items() if k in run.stored)
        run.say(f"reading {len(wal_objects)} WAL objects and {len(data_tasks)} backup objects with "
                f"{run.opts.jobs} threads")
        data_futs = [pool.submit(check_data_object, run.storage, k, es) for k, es in data_tasks]
        _tally_wal(run, wal_futs, wal_objects)
        _tally_data(run, data_futs)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _read_block_maps(run: _Run, work: Work, pool: ThreadPoolExecutor) -> None:
    maps = [t for t in work.maps.values() if t.key in run.stored]
    groups = by_path(maps)  # one path's chain of maps per thread, oldest first: each map is read once
    group_futs = [pool.submit(read_maps, run.storage, g) for g in groups]
    outcome: dict[int, MapOutcome] = {}
    for gfut, g in zip(group_futs, groups, strict=True):
        outcome.update((id(t), r) for t, r in zip(g, gfut.result(), strict=True))
    for t in maps:
        r = outcome[id(t)]
        if isinstance(r, (IntegrityError, NotFoundError)):
            run.res.problems.append(Problem(BLOCK_MAP, t.key, str(r)))
            continue
        bs, recs = r
        why = expect_blocks(t, bs, recs, work)
        if why:
            run.res.problems.append(Problem(BLOCK_MAP, t.key, why))
        elif t.entry.sources is not None and t.entry.ref is None:
            run.res.checked.files += 1  # checked block by block


def _report_missing_objects(run: _Run, work: Work) -> None:
    for key in sorted(set(work.needed_by) | {t.key for t in work.maps.values()}):
        if key not in run.stored:
            run.res.problems.append(_missing_object(key, work.needed_by.get(key, []) + [
                (t.backup, t.entry.path) for t in work.maps.values() if t.key == key]))


def _tally_wal(run: _Run, futs: list[Future[_Outcome]], wal_objects: list[ObjectInfo]) -> None:
    checked = run.res.checked
    for fut, o in zip(futs, wal_objects, strict=True):
        r = fut.result()  # a StorageError (endpoint down) ends the run: nothing can be judged
        run.res.problems.extend(r.problems)
        checked.bytes += r.bytes
        if o.key.startswith(HISTORY_PREFIX) or not _is_segment(o.key):
            checked.wal_other += 1
        else:
            checked.wal_segments += 1


def _tally_data(run: _Run, futs: list[Future[_Outcome]]) -> None:
    checked = run.res.checked
    for fut in futs:
        r = fut.result()
        run.res.problems.extend(r.problems)
        checked.bytes += r.bytes
        checked.files += r.files
        checked.backup_objects += 1


def _finish(run: _Run, work: Work) -> VerifyResult:
    """Count the files checked through another entry's envelope or block by block, and the empty ones; sort."""
    run.res.checked.files += work.files + sum(1 for m in run.manifests for e in m.files
                                              if e.object is None and e.size == 0)
    run.res.problems.sort(key=lambda p: (p.object, p.kind, p.detail))
    return run.res


def _missing_object(key: str, users: list[tuple[str, str]]) -> Problem:
    users = list(dict.fromkeys(users))
    backups = sorted({b for b, _ in users})
    paths = list(dict.fromkeys(p for _, p in users))
    names = ", ".join(paths[:3]) + (" …" if len(paths) > 3 else "")
    who = f"backup{'s' if len(backups) > 1 else ''} {', '.join(backups)} need{'' if len(backups) > 1 else 's'}"
    return Problem(OBJECT_MISSING, key, f"{who} it for {len(paths)} file(s) ({names}) but it is not stored")


def _read_dependencies(storage: Storage, m: Manifest, listed: set[str], by_id: dict[str, Manifest],
                       unreadable: set[str]) -> None:
    """Read the manifests of every backup m depends on (its chain, the backups its entries name),
    so a single backup's chain is judged and the objects it takes from them are read."""
    while True:
        todo = sorted(d for d in dependencies(m, by_id) if d in listed and d not in by_id and d not in unreadable)
        if not todo:
            return
        for bid in todo:
            try:
                by_id[bid] = read_manifest(storage, bid)
            except IntegrityError:
                unreadable.add(bid)
            except NotFoundError:
                listed.discard(bid)


def _write_once(key: str) -> bool:
    """Objects pitr writes exactly once: WAL (conditional creates) and backup manifests. pitr.json,
    restore points and drill records are legitimately replaced."""
    return key.startswith(WAL_PREFIX) or (key.startswith(BACKUP_PREFIX) and key.endswith("/manifest"))


def tamper_problems(storage: Storage) -> list[Problem]:
    """On a versioned S3 bucket: write-once objects that were overwritten (or deleted and written
    again) since pitr wrote them. Other backends keep no history: nothing to report."""
    inner = getattr(storage, "inner", storage)
    rewritten = getattr(inner, "rewritten", None)
    if rewritten is None:
        return []
    out = []
    for key, n, first in rewritten("", _write_once):
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(first))
        out.append(Problem(TAMPERED, key, f"has {n} versions: the current one is not the one pitr wrote at "
                                          f"{when} (--repo-as-of a moment after that, before the change, reads "
                                          "the original)"))
    return out


def _is_segment(key: str) -> bool:
    w = walname.parse(key.rsplit("/", 1)[-1])
    return w is not None and w.kind == "segment"
