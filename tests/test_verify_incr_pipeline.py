"""verify on a full -> incr -> incr chain written by the real backup pipeline (tests/test_incr_blocks.py's
Chain): clean as written, and a damaged block of the full backup that the newest incr still uses is
found when verifying only that incr. Runs once the block-incremental backup code is present."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytest.importorskip("pitr.ops.base.backup_incr")

from pitr.ops.proof.verify import VerifyOptions, verify  # noqa: E402
from pitr.repo import envelope  # noqa: E402
from pitr.repo.format import META_KEY, backup_dir  # noqa: E402
from pitr.repo.manifest import write_manifest  # noqa: E402
from pitr.repo.meta import new_meta  # noqa: E402
from pitr.storage.memory import MemoryStorage  # noqa: E402
from tests.test_incr_blocks import BS, Chain  # noqa: E402

PLAIN = envelope.Codec("none", 0)  # a damaged copy keeps its envelope's length


def test_a_pipeline_chain_verifies_and_a_reused_damaged_block_is_found(tmp_path: Path) -> None:
    c = Chain(tmp_path, PLAIN)
    c.write("base/5/16384", os.urandom(40 * BS))
    c.write("base/5/16385", os.urandom(300 * BS))
    c.write("base/5/16386", os.urandom(20 * BS), mtime=time.time() - 3600)  # referenced whole
    c.write("base/5/PG_VERSION", b"15\n")
    full = c.backup()
    c.patch("base/5/16384", 3, os.urandom(BS))
    c.patch("base/5/16385", 150, os.urandom(2 * BS))
    c.backup()
    c.patch("base/5/16385", 151, os.urandom(BS))
    newest = c.backup()
    c.storage.put(META_KEY, new_meta(1, 15, 16 << 20).to_json())
    for m in c.manifests:
        write_manifest(c.storage, m)

    def backup_problems(opts: VerifyOptions) -> list[tuple[str, str]]:
        return [(p.kind, p.detail) for p in verify(c.storage, opts).problems if p.object.startswith("backups/")]

    assert backup_problems(VerifyOptions()) == []
    assert backup_problems(VerifyOptions(newest.id)) == []

    e = next(x for x in full.files if x.path == "base/5/16385")
    key = backup_dir(full.id) + str(e.object)
    store = c.storage
    assert isinstance(store, MemoryStorage)
    body, mtime = store.objects[key]
    raw = bytearray(envelope.decode(body[e.offset:e.offset + e.length], max_size=e.size))
    raw[10 * BS] ^= 1  # block 10: unchanged since the full backup, so the newest incr reads it there
    env = envelope.encode(bytes(raw), PLAIN)  # a valid envelope of the wrong bytes
    store.objects[key] = (body[:e.offset] + env + body[e.offset + e.length:], mtime)
    got = backup_problems(VerifyOptions(newest.id))
    assert got == [("bad-block", f"block 10 of file base/5/16385 of backup {newest.id} (envelope at offset "
                                 f"{e.offset}) does not match its hash in the block map")]
    kinds = {k for k, _ in backup_problems(VerifyOptions())}
    assert kinds == {"bad-block", "file-mismatch"}  # the full backup's own file no longer matches either
