"""Open the storage backend a repository URL names (S3 support imported only when used)."""

from __future__ import annotations

from pitr.config import Settings
from pitr.storage.base import ObjectInfo, Storage

__all__ = ["ObjectInfo", "Storage", "open_storage"]


def open_storage(settings: Settings, *, max_connections: int | None = None) -> Storage:
    loc = settings.location()
    if loc.kind == "fs":
        from pitr.storage.fs import FsStorage

        assert loc.path is not None
        return FsStorage(loc.path)
    from pitr.storage.s3 import S3Storage

    return S3Storage(
        loc.bucket,
        loc.prefix,
        endpoint=settings.s3_endpoint,
        region=settings.s3_region,
        addressing=settings.s3_addressing,
        ca_bundle=settings.s3_ca_bundle,
        part_size=settings.s3_part_size_mb << 20,
        max_connections=max_connections or max(10, settings.jobs * 3),
        trust_conditional=not settings.allow_unsafe_store,
    )
