"""Push one WAL archive file to the repository, and fetch one back (archive/restore_command).

push: validate (name, size, page header vs name and cluster) -> envelope (zstd + BLAKE3) ->
conditional put -> on "exists", compare checksums: identical is success, different is a
conflict and nothing is overwritten. fetch: stream-decode into a temp file beside DEST, verify
checksum, size and header, then rename into place, so PostgreSQL never sees a partial file.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pitr.errors import (
    AlreadyExistsError,
    ConflictError,
    ForeignClusterError,
    IntegrityError,
    NotFoundError,
    NotInitializedError,
    PitrError,
    RepoMissingError,
    StorageError,
    UsageError,
    WalFileError,
)
from pitr.pg import walheader, walname
from pitr.repo import envelope
from pitr.repo.format import META_KEY, wal_key
from pitr.repo.meta import RepoMeta
from pitr.storage.base import Storage

log = logging.getLogger("pitr.archive")


@dataclass(frozen=True)
class PushResult:
    name: str
    key: str
    status: str  # "stored" | "already-archived"
    raw_size: int
    stored_size: int
    store_seconds: float = 0.0  # in storage.put (and its read-back): where a slow disk or endpoint shows


_thread = threading.local()


def thread_buffer(size: int) -> memoryview:
    """This thread's page-aligned buffer of `size` bytes, kept for the thread's life (the async archiver).

    Reading a 16 MiB segment into a fresh bytes object costs up to ~20 ms of CPU where reading it
    into a mapped buffer read before costs ~4.5 (docs/performance.md, ninth session): a freshly
    mapped object's pages fault in one by one (memtune.py) and it starts 16 bytes past a cache line.
    A push must not keep a view of it once it returns."""
    buf: memoryview | None = getattr(_thread, "buf", None)
    if buf is None or len(buf) != size:
        import mmap  # the helper's only: wal-push in the foreground never imports it

        buf = memoryview(mmap.mmap(-1, size))
        _thread.buf = buf
    return buf


def _read_into(path: Path, buf: memoryview) -> memoryview | bytes:
    """The file's bytes in buf (a view of its start), or as bytes when it does not fit."""
    with open(path, "rb", buffering=0) as f:
        n = 0
        while n < len(buf):
            got = f.readinto(buf[n:])
            if not got:
                return buf[:n]
            n += got
        rest = f.read()
    return bytes(buf) + rest if rest else buf[:n]  # larger than a segment: refused below, by size


def read_wal_file(path: Path, meta: RepoMeta,
                  buf: memoryview | None = None) -> tuple[walname.WalName, bytes | memoryview]:
    """Read and validate a file PostgreSQL asks us to archive; a segment into buf when given (thread_buffer)."""
    w = walname.parse(path.name)
    if w is None:
        raise WalFileError(
            f"{path.name} is not a WAL file name (expected a segment, .partial, .backup or .history file)",
            "archive_command must pass %p, the path of the file PostgreSQL wants archived",
        )
    data: bytes | memoryview
    try:
        data = _read_into(path, buf) if buf is not None and w.kind in ("segment", "partial") else path.read_bytes()
    except FileNotFoundError:
        raise WalFileError(
            f"WAL file {path} does not exist",
            "archive_command must pass %p; PostgreSQL runs it from the data directory",
        ) from None
    except IsADirectoryError:
        raise WalFileError(f"{path} is a directory, not a WAL file") from None
    except PermissionError:
        raise WalFileError(f"WAL file {path} is not readable by this user",
                           "run pitr as the PostgreSQL server's OS user") from None
    if w.kind in ("segment", "partial"):
        why = walheader.problem(w.segment or w.name, data, meta.wal_segment_size, meta.system_identifier)
        if why:
            raise WalFileError(f"refusing to archive {path.name}: the file {why}",
                               "only archive this cluster's WAL into this repository")
    else:
        assert isinstance(data, bytes)
        why = _text_file_problem(w, data, meta.wal_segment_size)
        if why:
            raise WalFileError(f"refusing to archive {path.name}: the file {why}",
                               "only archive this cluster's WAL into this repository")
    return w, data


def _text_file_problem(w: walname.WalName, data: bytes, seg_size: int) -> str | None:
    """What can be checked of a .history / .backup file, which carry no system identifier."""
    if len(data) > walname.SMALL_FILE_MAX:
        return f"is {len(data)} bytes, more than a {w.kind} file may hold ({walname.SMALL_FILE_MAX})"
    try:
        text = data.decode()
    except UnicodeDecodeError:
        # a backup label may be in the database's encoding; its WAL lines are ASCII either way
        text = data.decode("latin-1") if w.kind == "backup" else ""
        if w.kind == "history":
            return "is not a timeline history file (not text)"
    if w.kind == "history":
        return walname.history_problem(w.timeline, text)
    return walname.backup_history_problem(w.name, text, seg_size)


def _history_conflict(storage: Storage, w: walname.WalName, data: bytes) -> str | None:
    """A history file whose ancestry contradicts the archived history of its parent timeline is
    another cluster's (or another branch's): where both name a timeline, they must agree on where
    it ended. A parent history that is not archived (or unreadable) leaves nothing to compare; one
    that names ancestors this file leaves out is tolerated, as PostgreSQL writes only the new line
    when it could not read the parent's history."""
    from pitr.repo.catalog import read_history

    entries = walname.parse_history(data.decode())
    parent = entries[-1].parent
    if parent <= 1:
        return None
    try:
        archived = {e.parent: e.switch_lsn for e in read_history(storage, parent)}
    except NotFoundError:
        return None
    except (IntegrityError, ValueError) as err:
        log.warning("cannot compare %s with the archived history of timeline %d: %s", w.name, parent, err)
        return None
    for h in entries:
        if h.parent in archived and archived[h.parent] != h.switch_lsn:
            return (f"disagrees with the archived history of timeline {parent}: timeline {h.parent} ended at "
                    f"{walname.format_lsn(archived[h.parent])} there, at {walname.format_lsn(h.switch_lsn)} here")
    return None


def push(storage: Storage, meta: RepoMeta, path: Path, codec: envelope.Codec,
         buf: memoryview | None = None) -> PushResult:
    """Store one file durably; exit-0 semantics of archive_command (see module doc).

    buf: a segment is read into it (thread_buffer); nothing refers to it once push returns."""
    w, data = read_wal_file(path, meta, buf)
    if w.kind == "history":
        assert isinstance(data, bytes)
        why = _history_conflict(storage, w, data)
        if why:
            raise WalFileError(f"refusing to archive {path.name}: the file {why}",
                               "only archive this cluster's WAL into this repository")
    key = wal_key(w.name)
    mine = _Digests(data, envelope.digest_of(envelope.DIGESTS[envelope.VERSION], data))
    # history files compress to nothing worth having and are read by humans in a pinch
    body = envelope.encode(data, codec if w.kind != "history" else envelope.Codec("none", 0), mine.written)
    began = time.monotonic()
    try:
        storage.put(key, body, if_absent=True)
    except AlreadyExistsError:
        return _compare_existing(storage, key, w.name, mine, len(body))
    if not storage.conditional_writes_trusted:
        _read_back(storage, key, w.name, mine)
    return PushResult(w.name, key, "stored", len(data), len(body), time.monotonic() - began)


class _Digests:
    """The pushed bytes' digest in the algorithm an archived object's trailer holds: the one just
    written (hashed once, for the envelope), or SHA-256 for a version-1 object an older pitr wrote."""

    def __init__(self, data: bytes | memoryview, written: bytes) -> None:
        self.data, self.written, self.size = data, written, len(data)

    def same(self, t: envelope.Trailer) -> bool:
        if t.size != self.size:
            return False
        algo = envelope.DIGESTS[envelope.VERSION]
        mine = self.written if t.algo == algo else envelope.digest_of(t.algo, self.data)
        return t.digest == mine.hex()


def _stored_matches(storage: Storage, key: str, name: str, mine: _Digests) -> bool:
    """Whether the archived object holds the pushed bytes, judged by its trailer.

    One ranged read in the common case: the trailer is read as this pitr writes it (BLAKE3), and
    the header, which names the digest, is read only when that does not match (an object an older
    pitr wrote, a different segment, or something that is not a pitr object at all; the header's
    complaint comes first then, as it names the problem best)."""
    what = f"archived {name}"
    tail = storage.get_range(key, -envelope.TRAILER_SIZE)
    try:
        if mine.same(envelope.parse_trailer(tail, what, version=envelope.VERSION)):
            return True
    except IntegrityError:
        pass
    version = envelope.parse_header(storage.get_range(key, 0, envelope.HEADER_SIZE), what)
    return mine.same(envelope.parse_trailer(tail, what, version=version))


def _read_back(storage: Storage, key: str, name: str, mine: _Digests) -> None:
    """On a store whose conditional create is not atomic (accepted with allow_unsafe_store), a
    racing writer may have replaced our object: acknowledge only what the store holds now."""
    if not _stored_matches(storage, key, name, mine):
        raise ConflictError(
            f"another writer stored a different {name} at the same moment, and the store kept theirs",
            "two clusters may be archiving into one repository; the store cannot refuse the second "
            "(allow_unsafe_store is set), so check archive_command and the repository URL now",
        )


def _compare_existing(storage: Storage, key: str, name: str, mine: _Digests, stored: int) -> PushResult:
    for attempt in range(5):
        try:
            same = _stored_matches(storage, key, name, mine)
            break
        except NotFoundError:
            # a racing conditional write has not completed yet
            time.sleep(0.2 * (attempt + 1))
    else:
        raise StorageError(f"{name} is reported as existing but cannot be read back")
    if same:
        log.info("%s was already archived with identical content", name)
        return PushResult(name, key, "already-archived", mine.size, stored)
    raise ConflictError(
        f"the archive already holds a different {name}; nothing was overwritten",
        "two clusters may be archiving into one repository, or this cluster was restored without a new "
        "timeline; check archive_command and the repository URL",
    )


# --------------------------------------------------------------------------- fetch

def fetch(storage: Storage, meta: RepoMeta | None, name: str, dest: Path) -> int:
    """Fetch `name` into dest atomically; NotFoundError when the archive lacks it. Returns raw size."""
    w = walname.parse(name)
    if w is None:
        raise WalFileError(f"{name} is not a WAL file name")
    key = wal_key(name)
    src = storage.open(key)  # NotFoundError before anything is created
    tmp = dest.parent / f".{dest.name}.pitr-{os.getpid()}"
    try:
        with src, _open_dest(tmp, dest) as out:
            t = envelope.decode_stream(src, out, f"archived {name}", max_size=walname.max_size(
                w.kind, meta.wal_segment_size if meta else envelope.DEFAULT_MAX_SIZE))
            out.flush()
        if w.kind in ("segment", "partial") and meta is not None:
            with open(tmp, "rb") as f:
                head = f.read(walheader.HEAD_BYTES)
            why = walheader.problem(name, head, meta.wal_segment_size, meta.system_identifier, t.size)
            if why:
                raise IntegrityError(f"archived {name} {why}")
        os.replace(tmp, dest)
        return t.size
    except OSError as e:
        _remove(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # only writing DEST can run out of space
            raise _dest_error(e, dest) from None
        raise
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: Path) -> None:
    try:
        tmp.unlink()
    except (FileNotFoundError, NotADirectoryError):  # never created (DEST's directory is missing or a file)
        pass


def _open_dest(tmp: Path, dest: Path) -> BinaryIO:
    try:
        return open(tmp, "wb")
    except OSError as e:
        raise _dest_error(e, dest) from None


def _dest_error(e: OSError, dest: Path) -> PitrError:
    """DEST cannot be written: an environment error (one sentence naming DEST), not a bug."""
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        what = "does not exist" if e.errno == errno.ENOENT else "is not a directory"
        return UsageError(f"cannot write {dest}: its directory {dest.parent} {what}",
                          "restore_command must pass %p as DEST: restore_command = 'pitr wal-fetch %f %p' "
                          "(PostgreSQL runs it in the data directory)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "permission denied" if e.errno != errno.EROFS else "the file system is read-only"
        return PitrError(f"cannot write {dest}: {why}",
                         "run pitr as the PostgreSQL server's OS user (usually postgres), which owns %p's directory")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return PitrError(f"cannot write {dest}: the disk is full",
                         "free space on the file system of the data directory (%p), then start PostgreSQL again")
    return PitrError(f"cannot write {dest}: {e.strerror or e}",
                     "check the data directory's file system; %p is where PostgreSQL wants the file")


def confirm_missing(storage: Storage, meta: RepoMeta, name: str) -> None:
    """Called when `name` is not in the archive: raise unless the repository proves it is still there.

    "Not in the archive" makes PostgreSQL end recovery and promote, so it is only answered while
    the repository's metadata object exists, now, and names the same cluster. A directory that
    was unmounted (its empty mount point left behind) or a wiped prefix lists no object at all
    and would otherwise look like the end of the archive.
    """
    from pitr.repo.meta import read_meta

    try:
        now = read_meta(storage, fresh=True)  # the fs backend raises RepoMissingError when the directory is gone
    except NotInitializedError:
        raise RepoMissingError(
            f"the repository {storage.display} no longer holds its metadata ({META_KEY}), so it cannot tell "
            f"whether {name} was archived",
            "was it unmounted, moved or wiped? bring it back and start PostgreSQL again: recovery resumes "
            "where it stopped",
        ) from None
    if now.system_identifier != meta.system_identifier or now.wal_segment_size != meta.wal_segment_size:
        raise ForeignClusterError(
            f"the repository {storage.display} now belongs to the cluster with system identifier "
            f"{now.system_identifier}, not {meta.system_identifier}, so it cannot tell whether {name} was archived",
            "check what is mounted or configured at the repository location",
        )


def fetch_with_retries(storage: Storage, meta_loader: MetaLoader, name: str, dest: Path,
                       retries: int, forever: bool, sleep: float = 1.0) -> int:
    """fetch() with bounded (or endless) retries of hard failures; NotFoundError is never retried.

    NotFoundError comes out only after confirm_missing(): the repository is there and is this
    cluster's. A vanished one is RepoMissingError (wal-fetch exits 128, PostgreSQL stops recovery).
    """
    attempt = 0
    while True:
        try:
            try:
                return fetch(storage, meta_loader(), name, dest)
            except NotFoundError:
                confirm_missing(storage, meta_loader(), name)  # read at the miss, not cached from the start
                raise
        except (NotFoundError, RepoMissingError):
            raise  # "not archived" and "no such repository" do not get better with retries
        except (StorageError, IntegrityError) as e:
            attempt += 1
            if not forever and attempt > retries:
                raise
            delay = min(30.0, sleep * 2 ** min(attempt - 1, 5))
            log.warning("fetching %s failed (%s); retrying in %.1fs", name, e, delay)
            time.sleep(delay)
        except PitrError:
            raise


class MetaLoader:
    """Reads the repository metadata once (lazily) and caches it."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._meta: RepoMeta | None = None

    def __call__(self) -> RepoMeta:
        if self._meta is None:
            from pitr.repo.meta import read_meta

            try:
                self._meta = read_meta(self._storage)
            except NotInitializedError as e:
                # mid-recovery this is far more often a repository that went away than one never set up
                raise NotInitializedError(
                    f"the repository {self._storage.display} is not initialized (it holds no {META_KEY}), or it was "
                    "unmounted, moved or wiped", "check that the repository is there and is the one the "
                    "backup came from (`pitr init` only for a new one); then start PostgreSQL again") from e
        return self._meta
