"""Turn what this pitr wrote into what pitr wrote before envelope version 2 (a repository an older
pitr filled): every envelope of a backup or of the WAL re-encoded as version 1 (SHA-256 trailer),
backup entries binding `sha256` instead of `blake3`, manifests at most format 4.

Block maps keep their content (and their `map.sha256`, which is of the decoded map): an older pitr
of format 4 wrote the same maps, only in version-1 envelopes."""

from __future__ import annotations

import hashlib

from pitr.pg import walname
from pitr.repo import envelope
from pitr.repo.format import MAP2_MANIFEST_FORMAT, backup_dir
from pitr.repo.manifest import read_manifest, write_manifest
from pitr.storage.base import Storage
from tests.support.envelope_v1 import encode_v1

FIRST_NEW_OBJECT = 900000  # rewritten objects: data/9NNNNN, after anything a backup writes


def _v1(env: bytes) -> tuple[bytes, bytes]:
    """(raw, the same raw in a version-1 envelope of the same codec and level)."""
    raw = envelope.decode(env, max_size=1 << 31)
    codec = "zstd" if env[5] == 1 else "none"
    return raw, encode_v1(raw, codec, env[6] if codec == "zstd" else 0)


def downgrade_backup(storage: Storage, backup_id: str) -> None:
    """Backup `backup_id` (every entry stored in it, and its maps) as an older pitr wrote it."""
    m = read_manifest(storage, backup_id)
    home = backup_dir(backup_id)
    old_keys = [o.key for o in storage.list(home + "data/")]
    n = FIRST_NEW_OBJECT

    def rewrite(loc_object: str, offset: int, length: int) -> tuple[str, int, bytes]:
        nonlocal n
        env = storage.get_range(home + loc_object, offset, length)
        raw, v1 = _v1(env)
        key = f"data/{n:06d}"
        n += 1
        storage.put(home + key, v1)
        return key, len(v1), raw

    for e in m.files:
        if e.ref is not None or e.sources:
            raise ValueError("downgrade_backup takes a full backup (no refs, no block-incremental entries)")
        if e.object is not None:
            e.object, e.length, raw = rewrite(e.object, e.offset, e.length)
            e.offset = 0
            e.sha256, e.blake3 = hashlib.sha256(raw).hexdigest(), ""
        if e.map is not None:
            key, length, _ = rewrite(e.map["object"], e.map.get("offset", 0), e.map["length"])
            e.map.update(object=key, offset=0, length=length)
    for key in old_keys:
        storage.delete(key)
    m.format = min(m.format, MAP2_MANIFEST_FORMAT)
    m.pitr_version = "0.9-before-envelope-v2"
    write_manifest(storage, m)
    # the manifest itself, too, as an older pitr enveloped it
    mkey = home + "manifest"
    storage.put(mkey, _v1(storage.get(mkey))[1])


def downgrade_wal(storage: Storage) -> list[str]:
    """Every archived WAL file re-encoded as version 1; returns their names."""
    names = []
    for o in list(storage.list("wal/")):
        name = o.key.rsplit("/", 1)[1]
        if walname.parse(name) is None:
            continue
        storage.put(o.key, _v1(storage.get(o.key))[1])
        names.append(name)
    return names
