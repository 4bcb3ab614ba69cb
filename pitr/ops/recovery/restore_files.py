"""The restore's file pipeline: ranged reads of envelopes -> decode + verify the digest -> write.

`jobs` workers each run one Task at a time. A Task is either a run of small neighbouring envelopes
in one object (fetched with a single ranged read, decoded from memory) or one large envelope,
fetched in CHUNK ranges with the next range read ahead while the current one is decoded, so
network, decompression (zstd releases the GIL) and disk overlap. Memory stays bounded by
jobs x 2 x CHUNK whatever the database size. With --delta a file whose size and digest (for a
block-incremental entry of format 2: every block's hash in its effective map) already match is
kept (its mode, owner and mtime fixed) instead of fetched. An entry of a diff/incr backup either
refers whole to an older backup's object (`ref`: read from backups/<ref>/) or is assembled from
its sources block by block (ops/recovery/restore_assemble), one Task per such file.

Durability: with fsync=False the files are left to one syncfs() per filesystem afterwards
(sync_filesystems), which costs one flush instead of thousands of fsync() calls; the recipe does
that before it writes pg_control, so nothing startable exists before the data is on disk.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from pitr.errors import IntegrityError, Interrupted, NotFoundError, RestoreError
from pitr.ops.recovery.restore_assemble import assemble
from pitr.ops.recovery.restore_dest import remove_path
from pitr.repo import blockmap, envelope
from pitr.repo.format import backup_dir
from pitr.repo.manifest import FileEntry, Manifest
from pitr.repo.mapchain import Resolver, chain_ids, storage_lookup
from pitr.storage.base import Storage

CHUNK = 8 << 20  # ranged read size of a large file's envelope
BATCH_BYTES = 8 << 20  # small neighbouring envelopes fetched in one ranged read, up to this size
BATCH_HOLE = 256 << 10  # read across a hole this small rather than issue another request
# compressed bytes handed to zstd per call: PostgreSQL data often compresses 30x or more, and one
# call's output is held whole, so this bounds memory (128 KiB -> a few MiB out per worker)
DECODE_CHUNK = 128 << 10


@dataclass
class FileStats:
    files_written: int = 0
    bytes_written: int = 0
    files_kept: int = 0
    bytes_kept: int = 0
    removed: int = 0
    stored_bytes_read: int = 0
    seconds: float = 0.0
    bad_page_files: list[str] = field(default_factory=list)

    def add(self, other: FileStats) -> None:
        self.files_written += other.files_written
        self.bytes_written += other.bytes_written
        self.files_kept += other.files_kept
        self.bytes_kept += other.bytes_kept
        self.stored_bytes_read += other.stored_bytes_read


@dataclass(frozen=True)
class Item:
    entry: FileEntry
    dest: Path


@dataclass(frozen=True)
class Task:
    obj: str | None  # None: empty files
    start: int
    length: int
    items: tuple[Item, ...]
    stream: bool  # one large envelope, read in ranged chunks
    home: str | None = None  # the backup holding obj when not the restored one's (an entry's `ref`)
    assemble: bool = False  # one block-incremental file, assembled from its sources


def plan_tasks(files: Iterable[Item]) -> list[Task]:
    """Group envelopes into ranged reads: neighbours in one object share a read up to BATCH_BYTES."""
    by_obj: dict[tuple[str | None, str | None], list[Item]] = {}
    tasks: list[Task] = []
    for it in files:
        if it.entry.sources:
            tasks.append(Task(None, 0, it.entry.size, (it,), False, it.entry.ref, assemble=True))
            continue
        by_obj.setdefault((it.entry.ref, it.entry.object), []).append(it)
    for (home, obj), items in by_obj.items():
        if obj is None:
            tasks.extend(Task(None, 0, 0, (it,), False) for it in items)
            continue
        items.sort(key=lambda i: i.entry.offset)
        run: list[Item] = []
        for it in items:
            e = it.entry
            if e.length > BATCH_BYTES:
                tasks.append(Task(obj, e.offset, e.length, (it,), True, home))
                continue
            if run:
                start = run[0].entry.offset
                end = run[-1].entry.offset + run[-1].entry.length
                if e.offset - end > BATCH_HOLE or e.offset + e.length - start > BATCH_BYTES or e.offset < end:
                    tasks.append(_batch(obj, run, home))
                    run = []
            run.append(it)
        if run:
            tasks.append(_batch(obj, run, home))
    tasks.sort(key=lambda t: -t.length)  # big ones first: the pool finishes together
    return tasks


def _batch(obj: str, run: list[Item], home: str | None = None) -> Task:
    start = run[0].entry.offset
    end = max(i.entry.offset + i.entry.length for i in run)
    return Task(obj, start, end - start, tuple(run), False, home)


class RangeReader:
    """A read()-able view of bytes [offset, offset+length) of an object, fetched in CHUNK ranges
    with one range read ahead (on `ahead`), so download and decode overlap. Memory: 2 chunks."""

    def __init__(self, storage: Storage, key: str, offset: int, length: int, ahead: ThreadPoolExecutor,
                 cancel: threading.Event, chunk: int = CHUNK) -> None:
        self._storage, self._key, self._cancel, self._ahead = storage, key, cancel, ahead
        self._next_off, self._end, self._chunk = offset, offset + length, chunk
        self._buf = b""
        self._pos = 0
        self._pending: Future[bytes] | None = self._fetch_next()
        self.bytes_read = 0

    def _fetch_next(self) -> Future[bytes] | None:
        if self._next_off >= self._end:
            return None
        off, n = self._next_off, min(self._chunk, self._end - self._next_off)
        self._next_off += n
        return self._ahead.submit(self._storage.get_range, self._key, off, n)

    def read(self, n: int = -1) -> bytes:
        if self._cancel.is_set():
            raise Interrupted("restore interrupted")
        out: list[bytes] = []
        want = n if n >= 0 else 1 << 62
        while want > 0:
            if self._pos >= len(self._buf):
                if self._pending is None:
                    break
                self._buf = self._pending.result()
                self._pos = 0
                self.bytes_read += len(self._buf)
                self._pending = self._fetch_next()
                if not self._buf:
                    raise IntegrityError(f"object {self._key} is shorter than its manifest says")
            piece = self._buf[self._pos:self._pos + want]
            self._pos += len(piece)
            want -= len(piece)
            out.append(piece)
        return out[0] if len(out) == 1 else b"".join(out)

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()


class FileWriter:
    """Runs one Task: fetch, verify, write (fsync) -- or keep a matching file with --delta."""

    def __init__(self, storage: Storage, backup_id: str, owner: tuple[int, int] | None, delta: bool,
                 ahead: ThreadPoolExecutor, cancel: threading.Event, fsync: bool = True,
                 resolver: Resolver | None = None) -> None:
        self.storage, self.backup_id, self.owner, self.delta = storage, backup_id, owner, delta
        self.resolver = resolver or Resolver(storage, storage_lookup(storage), {backup_id})
        self.fsync = fsync
        self.prefix = backup_dir(backup_id)
        self.ahead, self.cancel = ahead, cancel

    def run(self, task: Task) -> FileStats:
        try:
            return self._run(task)
        except NotFoundError as e:
            if not (task.home or task.assemble):
                raise
            raise IntegrityError(f"backup {self.backup_id} builds on an older backup's data, and some is missing "
                                 f"({e})", "run `pitr verify`; restore another backup with --backup") from None

    def _run(self, task: Task) -> FileStats:
        st = FileStats()
        todo = []
        for it in task.items:
            if self.cancel.is_set():
                raise Interrupted("restore interrupted")
            if self.delta and self._matches(it, task.home or self.backup_id):
                self._settle(it.dest, it.entry)
                st.files_kept += 1
                st.bytes_kept += it.entry.size
            else:
                todo.append(it)
        if not todo:
            return st
        prefix = backup_dir(task.home) if task.home else self.prefix
        src_id = task.home or self.backup_id
        if task.assemble:
            it = todo[0]
            st.stored_bytes_read += self._assemble(it, task.home or self.backup_id)
            st.files_written += 1
            st.bytes_written += it.entry.size
        elif task.obj is None:
            for it in todo:
                with self._open(it) as f:
                    f.flush()
                    if self.fsync:
                        os.fsync(f.fileno())
                self._settle(it.dest, it.entry)
                st.files_written += 1
        elif task.stream:
            it = todo[0]
            reader = RangeReader(self.storage, prefix + task.obj, task.start, task.length, self.ahead, self.cancel)
            try:
                self._decode_to(reader, it)
            finally:
                reader.close()
            st.stored_bytes_read += reader.bytes_read
            st.files_written += 1
            st.bytes_written += it.entry.size
        else:
            start = min(i.entry.offset for i in todo)
            end = max(i.entry.offset + i.entry.length for i in todo)
            data = self.storage.get_range(prefix + task.obj, start, end - start)
            st.stored_bytes_read += len(data)
            if len(data) != end - start:
                raise IntegrityError(f"object {task.obj} of backup {src_id} is shorter than its manifest says")
            view = memoryview(data)
            for it in todo:
                e = it.entry
                piece = view[e.offset - start:e.offset - start + e.length]
                self._decode_to(_BytesReader(piece), it)
                st.files_written += 1
                st.bytes_written += e.size
        return st

    def _assemble(self, it: Item, home: str) -> int:
        """A block-incremental file: its map, then its blocks from every source (restore_assemble)."""
        e = it.entry
        what = f"backup {self.backup_id}'s copy of {e.path}"
        bmap = self.resolver.effective(home, e, f"{what} (block map)")

        def open_range(backup: str, obj: str, offset: int, length: int, chunk: int) -> RangeReader:
            return RangeReader(self.storage, backup_dir(backup) + obj, offset, length, self.ahead, self.cancel, chunk)

        with self._open(it) as f:
            read = assemble(e, home, bmap, open_range, f, what, CHUNK)  # type: ignore[arg-type]
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        self._settle(it.dest, e)
        return read

    def _matches(self, it: Item, home: str) -> bool:
        e = it.entry
        if e.digest or e.size == 0 or not e.sources:
            return _matches(it.dest, e)
        try:  # a block-incremental entry of format 2: compare block by block with its effective map
            st = os.lstat(it.dest)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size != e.size:
            return False
        bmap = self.resolver.effective(home, e, f"backup {self.backup_id}'s copy of {e.path} (block map)")
        return _blocks_match(it.dest, bmap)

    def _open(self, it: Item) -> BinaryIO:
        dest = it.dest
        if dest.is_symlink() or dest.is_dir():
            remove_path(dest)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            if self.owner:
                os.fchown(fd, *self.owner)
            os.fchmod(fd, (it.entry.mode & 0o7777) or 0o600)
        except BaseException:
            os.close(fd)
            raise
        return os.fdopen(fd, "wb", buffering=1 << 20)

    def _decode_to(self, src: BinaryIO | RangeReader | _BytesReader, it: Item) -> None:
        e = it.entry
        what = f"backup {self.backup_id}'s copy of {e.path}"
        with self._open(it) as f:
            trailer = envelope.decode_stream(src, f, what, chunk=DECODE_CHUNK, max_size=e.size)  # type: ignore[arg-type]
            if not e.digest_matches(trailer):  # size, digest and the digest's algorithm
                raise IntegrityError(f"{what} does not match its manifest entry (size or {e.algo} digest)",
                                     "run `pitr verify`; restore from another backup with --backup")
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        self._settle(it.dest, e)

    def _settle(self, dest: Path, e: FileEntry) -> None:
        os.chmod(dest, (e.mode & 0o7777) or 0o600)
        if self.owner:
            os.chown(dest, *self.owner)
        if e.mtime:
            os.utime(dest, (e.mtime, e.mtime))


class _BytesReader:
    def __init__(self, data: memoryview) -> None:
        self._data, self._pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else min(len(self._data), self._pos + n)
        out = bytes(self._data[self._pos:end])
        self._pos = end
        return out


def _blocks_match(dest: Path, bmap: blockmap.BlockMap) -> bool:
    bs, hs, want, fn = bmap.block_size, blockmap.HASH_SIZE, bmap.hash_bytes(), bmap.hash_fn
    b = 0
    with open(dest, "rb") as f:
        while buf := f.read(bs * 128):
            view = memoryview(buf)
            for i in range(len(buf) // bs):
                if fn(view[i * bs:(i + 1) * bs]) != want[b * hs:(b + 1) * hs]:
                    return False
                b += 1
    return b == bmap.count


def _matches(dest: Path, e: FileEntry) -> bool:
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != e.size:
        return False
    if e.size == 0:
        return True
    h = envelope.hasher(e.algo)
    with open(dest, "rb") as f:
        while buf := f.read(1 << 20):
            h.update(buf)
    return h.hexdigest() == e.digest


def write_files(storage: Storage, m: Manifest, items: list[Item], jobs: int, owner: tuple[int, int] | None,
                delta: bool, progress: Callable[[int, int], None] | None = None, fsync: bool = True) -> FileStats:
    """Restore items with `jobs` workers; any failure or interrupt cancels the rest and re-raises."""
    total = sum(i.entry.size for i in items)
    stats = FileStats()
    cancel = threading.Event()
    tasks = plan_tasks(items)
    t0 = time.monotonic()
    done_bytes = 0
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="pitr-ahead") as ahead:
        resolver = None
        if any(i.entry.sources for i in items):  # effective block maps resolve over m's chain
            lookup = storage_lookup(storage, [m])
            resolver = Resolver(storage, lookup, chain_ids(m, lookup))
        writer = FileWriter(storage, m.id, owner, delta, ahead, cancel, fsync, resolver)
        pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="pitr-restore")
        try:
            futs = {pool.submit(writer.run, t): t for t in tasks}
            pending = set(futs)
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
                for fut in done:
                    st = fut.result()  # re-raises a worker's failure
                    stats.add(st)
                    done_bytes += sum(i.entry.size for i in futs[fut].items)
                if done and progress:
                    progress(done_bytes, total)
        except BaseException:
            cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    stats.seconds = time.monotonic() - t0
    stats.bad_page_files = [f.path for f in m.files if f.bad_pages]
    return stats


def sync_filesystems(roots: Iterable[Path]) -> None:
    """Flush every filesystem holding one of roots: syncfs(2) on Linux, else sync(2). A failure
    (EIO: written-back data was lost) fails the restore: pg_control must not follow it."""
    import ctypes
    import ctypes.util

    seen: set[int] = set()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    syncfs = getattr(libc, "syncfs", None)
    for root in roots:
        try:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise RestoreError(f"cannot open {root} to flush the restored files to disk: {e.strerror}",
                               "check the filesystem and restore again") from None
        try:
            dev = os.fstat(fd).st_dev
            if dev in seen:
                continue
            seen.add(dev)
            if syncfs is None:
                os.sync()
            elif syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise RestoreError(f"flushing the restored files under {root} to disk failed: {os.strerror(err)}; "
                                   "the restore is not durable, so pg_control was not written",
                                   "check the disk (dmesg) and restore again")
        finally:
            os.close(fd)
