"""`pitr init`: bind a repository to one cluster (system identifier, major version, segment size)."""

from __future__ import annotations

from dataclasses import dataclass

from pitr.errors import AlreadyExistsError, NotInitializedError
from pitr.pg.conn import ServerInfo
from pitr.repo.format import META_KEY
from pitr.repo.meta import RepoMeta, check_cluster, new_meta, read_meta
from pitr.storage.base import Storage


@dataclass(frozen=True)
class InitResult:
    meta: RepoMeta
    created: bool


def init_repo(storage: Storage, server: ServerInfo) -> InitResult:
    """Write the metadata once; same cluster again is a no-op; another cluster is refused."""
    storage.create()
    try:
        meta = read_meta(storage)
    except NotInitializedError:
        meta = new_meta(server.system_identifier, server.major, server.wal_segment_size)
        try:
            storage.put(META_KEY, meta.to_json(), if_absent=True)
            return InitResult(meta, True)
        except AlreadyExistsError:
            meta = read_meta(storage)  # a concurrent init won: judge its result like any other
    check_cluster(meta, server.system_identifier, storage)
    return InitResult(meta, False)
