"""Local-directory backend: temp file, fsync, then rename (or link for if_absent), fsync dir."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from pitr.errors import AlreadyExistsError, NotFoundError, RepoMissingError, StorageError
from pitr.storage.base import CHUNK, ObjectInfo, Storage, TempObject

TMP_PREFIX = ".tmp."


def fsync_dir(path: Path) -> None:
    """Make a directory's entries durable (a created, renamed or linked name); OSError on failure."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FsStorage(Storage):
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.display = str(self.root)
        self._synced: set[Path] = set()  # directories whose entry this process has made durable

    # --- helpers
    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise StorageError(f"invalid object key {key!r}")
        return self.root / key

    def _oserror(self, e: OSError, what: str) -> StorageError:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return StorageError(
                f"cannot {what} in repository directory {self.root}: {e.strerror}",
                "make the directory writable (and readable) by the OS user running pitr, e.g. postgres",
            )
        if e.errno == errno.ENOSPC:
            return StorageError(f"cannot {what} in repository directory {self.root}: the disk is full")
        return StorageError(f"cannot {what} in repository directory {self.root}: {e.strerror or e}")

    def _require_root(self) -> None:
        try:
            st = os.stat(self.root)
        except (FileNotFoundError, NotADirectoryError):
            raise RepoMissingError(
                f"repository directory {self.root} does not exist",
                "create it (owned by the postgres OS user) or fix --repo / PITR_REPO",
            ) from None
        except PermissionError:
            # a parent directory is not searchable: "does not exist" would send the user the wrong way
            raise StorageError(
                f"repository directory {self.root} cannot be reached by this user (permission denied on a parent)",
                "let the OS user running pitr (usually postgres) enter every directory on the path",
            ) from None
        if not stat.S_ISDIR(st.st_mode):
            raise StorageError(f"repository path {self.root} is not a directory", "fix --repo / PITR_REPO")

    def _makedirs(self, d: Path) -> None:
        """Make d and its parents below the root exist durably: each one's entry is fsynced in its
        parent even when it already exists, as whoever made it (a crashed writer, a concurrent one
        still before its fsync) may not have synced it yet. Once per directory per process."""
        if d == self.root or d in self._synced:
            return
        self._makedirs(d.parent)
        try:
            d.mkdir()
        except FileExistsError:
            pass
        fsync_dir(d.parent)
        self._synced.add(d)

    def _fsync_existing(self, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return  # deleted meanwhile: the caller's read-back reports it
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path.parent)

    # --- interface
    def put(self, key: str, data: bytes | BinaryIO, *, if_absent: bool = False) -> None:
        self._require_root()
        final = self._path(key)
        tmp = final.parent / f"{TMP_PREFIX}{final.name}.{uuid.uuid4().hex[:12]}"
        try:
            self._makedirs(final.parent)
            with open(tmp, "wb") as f:
                if isinstance(data, bytes | bytearray | memoryview):
                    f.write(data)
                else:
                    shutil.copyfileobj(data, f, CHUNK)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o440)  # stored objects are immutable
            if if_absent:
                # link() fails if the name exists, unlike rename(): exactly one racer wins
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    # the caller may take the existing object as its own (an identical re-push):
                    # make it as durable as a new one, its writer may have died before syncing
                    self._fsync_existing(final)
                    raise AlreadyExistsError(f"object {key} already exists") from None
                finally:
                    tmp.unlink(missing_ok=True)
            else:
                os.replace(tmp, final)
            fsync_dir(final.parent)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise self._oserror(e, f"write {key}") from e
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            self._require_root()
            raise NotFoundError(f"object {key} not found in {self.root}") from None
        except OSError as e:
            raise self._oserror(e, f"read {key}") from e

    def get_range(self, key: str, start: int, length: int | None = None) -> bytes:
        with self.open(key) as f:
            if start < 0:
                f.seek(max(0, os.fstat(f.fileno()).st_size + start))
            else:
                f.seek(start)
            return f.read() if length is None else f.read(length)

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            self._require_root()
            return None
        except OSError as e:
            raise self._oserror(e, f"read {key}") from e
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self._require_root()
        # walk only the directory that can hold the prefix
        base_rel = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.root / base_rel if base_rel else self.root
        if not base.is_dir():
            return
        out: list[ObjectInfo] = []
        try:
            for dirpath, dirnames, filenames in os.walk(base):
                dirnames.sort()
                rel_dir = os.path.relpath(dirpath, self.root)
                for name in filenames:
                    if name.startswith(TMP_PREFIX):
                        continue
                    key = name if rel_dir == "." else f"{rel_dir}/{name}"
                    if key.startswith(prefix):
                        try:
                            st = os.stat(os.path.join(dirpath, name))
                        except FileNotFoundError:
                            continue
                        out.append(ObjectInfo(key, st.st_size, st.st_mtime))
        except OSError as e:
            raise self._oserror(e, "list objects") from e
        out.sort(key=lambda o: o.key)
        yield from out

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as e:
            raise self._oserror(e, f"delete {key}") from e

    def delete_prefix(self, prefix: str) -> None:
        super().delete_prefix(prefix)
        top = self._path(prefix.rstrip("/"))
        # its parent may go too (below): forget both, or a later put would skip making them again
        gone = top.parent if top.parent != self.root else top
        self._synced = {d for d in self._synced if not d.is_relative_to(gone)}
        try:
            for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
                os.rmdir(dirpath)  # bottom-up: only directories that are empty
            if top.parent != self.root:
                top.parent.rmdir()
        except OSError:
            pass  # not empty (someone else's probe) or gone: nothing to tidy

    def stale_temps(self, older_than: float, now: float) -> Sequence[TempObject]:
        """`.tmp.*` files left by a put() that was killed (kill -9, power loss) before its rename."""
        self._require_root()
        out: list[TempObject] = []
        try:
            for dirpath, _dirs, filenames in os.walk(self.root):
                for name in filenames:
                    if not name.startswith(TMP_PREFIX):
                        continue
                    try:
                        st = os.lstat(os.path.join(dirpath, name))
                    except FileNotFoundError:
                        continue  # its writer finished (renamed or unlinked it) meanwhile
                    if stat.S_ISREG(st.st_mode) and now - st.st_mtime > older_than:
                        rel = os.path.relpath(os.path.join(dirpath, name), self.root)
                        out.append(TempObject(rel, st.st_size, st.st_mtime))
        except OSError as e:
            raise self._oserror(e, "list temporary files") from e
        return sorted(out, key=lambda t: t.key)

    def remove_temps(self, temps: Sequence[TempObject]) -> None:
        for t in temps:
            if not t.key.rsplit("/", 1)[-1].startswith(TMP_PREFIX):
                raise StorageError(f"refusing to remove {t.key!r}: not a temporary file")
            try:
                self._path(t.key).unlink(missing_ok=True)
            except OSError as e:
                raise self._oserror(e, f"remove the temporary file {t.key}") from e

    def check(self, write: bool = False) -> None:
        self._require_root()
        if write and not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(
                f"repository directory {self.root} is not writable by this user",
                "make it writable by the OS user running pitr (usually postgres)",
            )
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise StorageError(f"repository directory {self.root} is not readable by this user")

    def create(self) -> None:
        try:
            missing = [p for p in (self.root, *self.root.parents) if not p.exists()]
            self.root.mkdir(parents=True, exist_ok=True)
            for p in missing:  # each new directory's entry, durably
                fsync_dir(p.parent)
        except OSError as e:
            raise self._oserror(e, "create the directory") from e
        self.check(write=True)
