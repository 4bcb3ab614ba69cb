"""Copy a backup's files into the repository: read -> BLAKE3 + page checks -> zstd -> store.

Pipeline over --jobs worker threads and bounded queues (zstd, hashlib, numpy and socket I/O
release the GIL, so threads use every core):

    main thread ──units──▶ encoders (jobs) ──bundles──▶ uploaders (jobs) ──▶ storage.put
                              └─ large file: streamed straight into storage.put (multipart on S3)

- Small files are batched into bundle objects (several envelopes back to back, up to
  `bundle_size` raw bytes) so per-request overhead does not dominate on S3; the manifest
  records each file's object, offset and length.
- A large file gets its own object and is streamed in 1 MiB chunks: never whole in memory.
- Memory is bounded by the queue sizes: about jobs x (bundle_size + one multipart window).
- A file is copied up to its size at scan time (what grew since was written during the backup
  and is rebuilt by WAL replay); a file that vanished is left out; the size read is recorded.
- A relation file may have a BlockJob (ops/base/backup_incr): it sees every byte read, hashes each
  block, and says what to store (the whole file, or only its changed blocks); its block map is
  stored right after the file's envelope, in the same bundle or large object.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from pitr.errors import BackupError
from pitr.ops.base.backup_files import SourceFile
from pitr.pg.pagecheck import BatchChecker, PageChecker
from pitr.repo import envelope
from pitr.repo.format import backup_data_key
from pitr.repo.manifest import FileEntry
from pitr.storage.base import Storage

log = logging.getLogger("pitr.backup")

MiB = 1 << 20
READ_CHUNK = MiB
_POLL = 0.2  # seconds between checks of the abort flag while blocked on a queue

Progress = Callable[[int, int], None]  # (raw bytes done, raw bytes total)


@dataclass(frozen=True)
class StoreOptions:
    backup_id: str
    codec: envelope.Codec
    jobs: int = 2
    start_lsn: int = 0  # pages at or past it are not judged (written during the backup)
    block_size: int = 8192
    bundle_size: int = 16 * MiB  # raw bytes per bundle object
    large_file: int = 4 * MiB  # files at least this big get their own, streamed object


@dataclass
class StoreResult:
    entries: list[FileEntry] = field(default_factory=list)
    raw_bytes: int = 0
    stored_bytes: int = 0
    objects: int = 0
    vanished: list[str] = field(default_factory=list)


@dataclass
class _Unit:
    number: int
    files: list[SourceFile]
    large: bool


class BlockJob(Protocol):
    """What ops/base/backup_incr does to one relation file while it is read (module doc)."""

    def feed(self, data: bytes) -> bytes:
        """The next bytes read (from offset 0, in order); returns the bytes to store."""
        ...

    def map_bytes(self) -> bytes | None:
        """Once everything was fed: the file's block map, or None (not whole blocks after all)."""
        ...

    def finish(self, entry: FileEntry) -> None:
        """Complete the entry (its size, object and map are set): whole-file digest, sources."""
        ...


BlockJobs = Callable[[SourceFile], "BlockJob | None"]


class _Aborted(Exception):
    """Internal: another thread failed or the backup was interrupted."""


class Pipeline:
    """One backup's copy job. run() may be called more than once (pg_control goes last, alone)."""

    def __init__(self, storage: Storage, opts: StoreOptions, total_bytes: int = 0,
                 progress: Progress | None = None, abort: threading.Event | None = None,
                 block_jobs: BlockJobs | None = None) -> None:
        self.storage = storage
        self.block_jobs = block_jobs
        self.opts = opts
        self.total = total_bytes
        self.progress = progress
        self.abort = abort or threading.Event()
        self.result = StoreResult()
        self._next_object = 0
        self._lock = threading.Lock()
        self._done = 0
        self._error: BaseException | None = None

    # --- planning
    def units(self, files: list[SourceFile]) -> Iterator[_Unit]:
        """Large files first (biggest first, so the tail is short), then bundles of small ones."""
        large = sorted((f for f in files if f.size >= self.opts.large_file), key=lambda f: -f.size)
        for f in large:
            yield _Unit(self._take_number(), [f], True)
        batch: list[SourceFile] = []
        size = 0
        for f in files:
            if f.size >= self.opts.large_file:
                continue
            batch.append(f)
            size += f.size
            if size >= self.opts.bundle_size:
                yield _Unit(self._take_number(), batch, False)
                batch, size = [], 0
        if batch:
            yield _Unit(self._take_number(), batch, False)

    def _take_number(self) -> int:
        n = self._next_object
        self._next_object += 1
        return n

    # --- running
    def run(self, files: list[SourceFile]) -> None:
        """Copy files with jobs encoders and jobs uploaders; raises the first failure."""
        jobs = max(1, self.opts.jobs)
        work: queue.Queue[_Unit | None] = queue.Queue(maxsize=jobs * 2)
        uploads: queue.Queue[tuple[str, bytes, list[FileEntry]] | None] = queue.Queue(maxsize=jobs)
        encoders = [threading.Thread(target=self._guard, args=(self._encoder, work, uploads), daemon=True,
                                     name=f"pitr-encode-{i}") for i in range(jobs)]
        uploaders = [threading.Thread(target=self._guard, args=(self._uploader, uploads), daemon=True,
                                      name=f"pitr-upload-{i}") for i in range(jobs)]
        for t in encoders + uploaders:
            t.start()
        try:
            for unit in self.units(files):
                self._put(work, unit)
            for _ in encoders:
                self._put(work, None)
            self._join(encoders)
            for _ in uploaders:
                self._put(uploads, None)
            self._join(uploaders)
        except BaseException:
            self.abort.set()
            # let workers notice and stop before the caller deletes what they wrote
            deadline = time.monotonic() + 10
            for t in encoders + uploaders:
                t.join(max(0.0, deadline - time.monotonic()))
            raise
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error
        if self.abort.is_set():
            raise _Aborted()

    def _join(self, threads: list[threading.Thread]) -> None:
        for t in threads:
            while t.is_alive():
                t.join(_POLL)  # a timed join keeps the main thread responsive to signals
                if self._error is not None or self.abort.is_set():
                    self._raise_error()

    def _put(self, q: queue.Queue, item: object) -> None:  # type: ignore[type-arg]
        while True:
            if self.abort.is_set():
                self._raise_error()
            try:
                q.put(item, timeout=_POLL)
                return
            except queue.Full:
                continue

    def _get(self, q: queue.Queue) -> object:  # type: ignore[type-arg]
        while True:
            if self.abort.is_set():
                raise _Aborted()
            try:
                return q.get(timeout=_POLL)
            except queue.Empty:
                continue

    def _guard(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except _Aborted:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            with self._lock:
                if self._error is None:
                    self._error = e
            self.abort.set()

    def _encoder(self, work: queue.Queue, uploads: queue.Queue) -> None:  # type: ignore[type-arg]
        while True:
            unit = self._get(work)
            if unit is None:
                return
            assert isinstance(unit, _Unit)
            if unit.large:
                self._store_large(unit)
            else:
                built = self._build_bundle(unit)
                if built is not None:
                    self._put(uploads, built)

    def _uploader(self, uploads: queue.Queue) -> None:  # type: ignore[type-arg]
        while True:
            item = self._get(uploads)
            if item is None:
                return
            assert isinstance(item, tuple)
            key, body, entries = item
            self.storage.put(key, body)
            self._record(entries, len(body))

    def _record(self, entries: list[FileEntry], stored: int) -> None:
        with self._lock:
            self.result.entries.extend(entries)
            self.result.stored_bytes += stored
            self.result.raw_bytes += sum(e.size for e in entries)
            if stored:
                self.result.objects += 1

    def _advance(self, n: int) -> None:
        if self.progress is None or not n:
            return
        with self._lock:
            self._done += n
            done = self._done
        self.progress(done, self.total)

    def _vanished(self, f: SourceFile) -> None:
        log.info("%s vanished during the backup (dropped); not copied", f.rel)
        with self._lock:
            self.result.vanished.append(f.rel)

    # --- one unit
    def _open(self, f: SourceFile) -> BinaryIO | None:
        try:
            return open(f.path, "rb", buffering=0)
        except FileNotFoundError:
            self._vanished(f)
            return None
        except PermissionError:
            raise BackupError(f"cannot read {f.path}: permission denied",
                              "run pitr backup as the PostgreSQL server's OS user (e.g. postgres)") from None

    def _checker(self, f: SourceFile) -> PageChecker | None:
        if not f.checksummed:
            return None
        return PageChecker(self.opts.start_lsn, f.blkno_base, self.opts.block_size)

    def _build_bundle(self, unit: _Unit) -> tuple[str, bytes, list[FileEntry]] | None:
        rel_key = f"data/{unit.number:06d}"
        parts: list[bytes] = []
        entries: list[FileEntry] = []
        checks = BatchChecker(self.opts.start_lsn, self.opts.block_size)
        offset = 0
        for f in unit.files:
            if self.abort.is_set():
                raise _Aborted()
            src = self._open(f)
            if src is None:
                continue
            with src:
                st = os.fstat(src.fileno())
                data = _read_upto(src, f.size)
            self._advance(len(data))
            if f.checksummed:
                checks.add(f.rel, data, f.blkno_base)
            mode, mtime = st.st_mode & 0o7777, st.st_mtime
            if not data:
                entries.append(FileEntry(f.rel, 0, "", mode, mtime, None))
                continue
            job = self.block_jobs(f) if self.block_jobs is not None else None
            if job is not None:
                offset = self._bundle_blocks(job, f, data, mode, mtime, rel_key, offset, parts, entries)
                continue
            env = envelope.encode(data, self.opts.codec)
            e = FileEntry(f.rel, len(data), "", mode, mtime, rel_key, offset, len(env))
            e.bind(envelope.parse_trailer(env, f.rel, version=envelope.VERSION))
            entries.append(e)
            parts.append(env)
            offset += len(env)
        bad = checks.run()  # one vector pass over every page of the bundle
        for e in entries:
            if e.path in bad:
                e.bad_pages = bad[e.path]
        if not parts:
            self._record(entries, 0)
            return None
        return backup_data_key(self.opts.backup_id, unit.number), b"".join(parts), entries

    def _bundle_blocks(self, job: BlockJob, f: SourceFile, data: bytes, mode: int, mtime: float, rel_key: str,
                       offset: int, parts: list[bytes], entries: list[FileEntry]) -> int:
        """A relation file in a bundle: what its BlockJob keeps, then its block map."""
        keep = job.feed(data)
        e = FileEntry(f.rel, len(data), "", mode, mtime, None)
        if keep:  # a block-incremental file with no changed block stores no envelope
            env = envelope.encode(keep, self.opts.codec)
            e.bind(envelope.parse_trailer(env, f.rel, version=envelope.VERSION))
            e.object, e.offset, e.length = rel_key, offset, len(env)
            parts.append(env)
            offset += len(env)
        mb = job.map_bytes()
        if mb is not None:
            menv = envelope.encode(mb, self.opts.codec)
            e.map = {"object": rel_key, "offset": offset, "length": len(menv)}
            parts.append(menv)
            offset += len(menv)
        job.finish(e)
        entries.append(e)
        return offset

    def _store_large(self, unit: _Unit) -> None:
        f = unit.files[0]
        job = self.block_jobs(f) if self.block_jobs is not None else None
        if job is not None:
            self._store_large_blocks(unit, job)
            return
        src = self._open(f)
        if src is None:
            return
        key = backup_data_key(self.opts.backup_id, unit.number)
        with src:
            st = os.fstat(src.fileno())
            reader = _SourceReader(src, f.size, self._checker(f), self._advance, self.abort)
            try:
                body = envelope.EncodedReader(envelope.encode_stream(reader, self.opts.codec, READ_CHUNK))  # type: ignore[arg-type]
                self.storage.put(key, body)  # type: ignore[arg-type]
            finally:
                reader.close()
        t = envelope.parse_trailer(body.tail, f.rel, version=envelope.VERSION)
        mode, mtime = st.st_mode & 0o7777, st.st_mtime
        entry = FileEntry(f.rel, t.size, "", mode, mtime, f"data/{unit.number:06d}", 0, body.emitted,
                          _bad(reader.checker))
        entry.bind(t)
        self._record([entry], body.emitted)


    def _store_large_blocks(self, unit: _Unit, job: BlockJob) -> None:
        """A large relation file: what its BlockJob keeps, streamed, then its block map, in one object."""
        f = unit.files[0]
        src = self._open(f)
        if src is None:
            return
        rel_key = f"data/{unit.number:06d}"
        codec = self.opts.codec
        seen: dict[str, int | bytes] = {}

        def pieces() -> Iterator[bytes]:
            n, tail = 0, b""
            for p in envelope.encode_stream(reader, codec, READ_CHUNK):  # type: ignore[arg-type]
                n += len(p)
                tail = p[-envelope.TRAILER_SIZE:] if len(p) >= envelope.TRAILER_SIZE \
                    else (tail + p)[-envelope.TRAILER_SIZE:]
                yield p
            seen["length"], seen["tail"] = n, tail
            mb = job.map_bytes()
            if mb is not None:
                menv = envelope.encode(mb, codec)
                seen["map"] = len(menv)
                yield menv

        with src:
            st = os.fstat(src.fileno())
            reader = _SourceReader(src, f.size, self._checker(f), self._advance, self.abort, job)
            try:
                body = envelope.EncodedReader(pieces())
                self.storage.put(backup_data_key(self.opts.backup_id, unit.number), body)  # type: ignore[arg-type]
            finally:
                reader.close()
        length = int(seen["length"])  # type: ignore[call-overload]
        t = envelope.parse_trailer(seen["tail"], f.rel, version=envelope.VERSION)  # type: ignore[arg-type]
        e = FileEntry(f.rel, reader.raw, "", st.st_mode & 0o7777, st.st_mtime, rel_key, 0, length,
                      _bad(reader.checker))
        e.bind(t)
        if "map" in seen:
            e.map = {"object": rel_key, "offset": length, "length": seen["map"]}
        job.finish(e)
        self._record([e], body.emitted)


def _bad(checker: PageChecker | None) -> list[int]:
    return list(checker.bad) if checker is not None else []


def _read_upto(src: BinaryIO, limit: int) -> bytes:
    chunks = []
    left = limit
    while left > 0:
        b = src.read(min(left, READ_CHUNK * 4))
        if not b:
            break
        chunks.append(b)
        left -= len(b)
    return b"".join(chunks)


class _SourceReader:
    """A large file read up to its scanned size by a helper thread that also verifies its pages,
    a few chunks ahead of the consumer (which hashes and compresses): two cores on one file."""

    AHEAD = 4  # chunks in flight: memory READ_CHUNK * AHEAD

    def __init__(self, src: BinaryIO, limit: int, checker: PageChecker | None, advance: Callable[[int], None],
                 abort: threading.Event, job: BlockJob | None = None) -> None:
        self.src = src
        self.job = job
        self.raw = 0  # bytes read from the file (what the consumer gets may be less with a job)
        self.left = limit
        self.checker = checker
        self.advance = advance
        self.abort = abort
        self._q: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=self.AHEAD)
        self._stop = threading.Event()
        self._pending = b""
        self._eof = False
        self._thread = threading.Thread(target=self._produce, daemon=True, name="pitr-read")
        self._thread.start()

    def _produce(self) -> None:
        try:
            while self.left > 0:
                data = self._read_chunk(min(READ_CHUNK, self.left))
                if not data:
                    break
                self.left -= len(data)
                self.raw += len(data)
                if self.checker is not None:
                    self.checker.feed(data)
                if self.job is not None:
                    self.advance(len(data))
                    data = self.job.feed(data)
                    if not data:
                        continue  # nothing to store from this chunk (b"" would read as the end)
                if not self._offer(data):
                    return
            self._offer(b"")
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._offer(e)

    def _read_chunk(self, want: int) -> bytes:
        data = self.src.read(want)
        while data and len(data) < want:  # an unbuffered read may return short: keep pages whole
            more = self.src.read(want - len(data))
            if not more:
                break
            data += more
        return data

    def _offer(self, item: bytes | BaseException) -> bool:
        while not (self._stop.is_set() or self.abort.is_set()):
            try:
                self._q.put(item, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def read(self, n: int = -1) -> bytes:
        while not self._eof and (n < 0 or len(self._pending) < n):
            if self.abort.is_set():
                raise _Aborted()
            try:
                item = self._q.get(timeout=_POLL)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                raise item
            if not item:
                self._eof = True
                break
            if self.job is None:
                self.advance(len(item))
            self._pending = self._pending + item if self._pending else item
        if n < 0 or n >= len(self._pending):
            out, self._pending = self._pending, b""
        else:
            out, self._pending = self._pending[:n], self._pending[n:]
        return out

    def close(self) -> None:
        """Stop the helper thread (also when the consumer gave up early)."""
        self._stop.set()
        self._thread.join(5)


def is_internal_abort(e: BaseException) -> bool:
    return isinstance(e, _Aborted)

