"""`pitr init`: bind a repository to one cluster (system identifier, major version, segment size)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pitr.errors import AlreadyExistsError, NotInitializedError
from pitr.ops.storecheck import require_conditional_create
from pitr.pg.conn import ServerInfo
from pitr.repo.format import META_KEY
from pitr.repo.meta import RepoMeta, check_cluster, new_meta, read_meta
from pitr.storage.base import Storage

log = logging.getLogger("pitr.init")


@dataclass(frozen=True)
class InitResult:
    meta: RepoMeta
    created: bool


def init_repo(storage: Storage, server: ServerInfo, allow_unsafe_store: bool = False) -> InitResult:
    """Write the metadata once; same cluster again is a no-op; another cluster is refused.

    First the store must prove its conditional create (racing creates: exactly one wins; a second
    create refused), on every run: a store that fails is refused unless the user accepted it."""
    storage.create()
    for p in require_conditional_create(storage, allow_unsafe_store):
        log.warning("the store %s fails %s (%s); accepted because allow_unsafe_store is set",
                    storage.display, p.name, p.detail)
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
