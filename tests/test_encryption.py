"""Encryption at rest without PostgreSQL: the chunked AES-256-GCM object format (round trips, ranged
reads at every boundary, tampering of every kind named), the key hierarchy (key files, passphrases,
wrong keys), and that a repository opened without its key refuses before reading any object."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from pitr.errors import ConfigError, EncryptionKeyError, IntegrityError
from pitr.pg.conn import ServerInfo
from pitr.repo import crypto, keys
from pitr.repo.format import META_KEY
from pitr.repo.meta import read_meta
from pitr.repo.sealed import RepoStorage
from pitr.storage.fs import FsStorage
from pitr.storage.memory import MemoryStorage

C = 1 << crypto.CHUNK_LOG2
SIZES = [0, 1, C - 1, C, C + 1, 3 * C, 3 * C + 17]


def cipher() -> crypto.ObjectCipher:
    return crypto.ObjectCipher(os.urandom(32))


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_whole_stream_and_ranges(size: int) -> None:
    c = cipher()
    data = os.urandom(size)
    sealed = c.seal("backups/x/data/000001", data)
    assert crypto.plain_size(len(sealed)) == size
    assert c.open_bytes("backups/x/data/000001", sealed) == data
    streamed = c.sealing_reader("k", io.BytesIO(data)).read()
    assert c.open_bytes("k", streamed) == data
    assert c.opening_reader("k", io.BytesIO(streamed)).read() == data

    def fetch(off: int, n: int | None) -> bytes:
        return streamed[off:] if n is None else streamed[off:off + n]

    for start in sorted({0, 1, C - 1, C, C + 1, 2 * C + 5, max(0, size - 1)}):
        for length in (1, 7, C, C + 2):
            got = c.read_range("k", fetch, start, length, lambda: len(streamed))
            assert got == data[start:start + length], (start, length)
    assert c.read_range("k", fetch, -48, None, lambda: len(streamed)) == data[-48:]


def test_marker_never_in_ciphertext() -> None:
    marker = b"TOP-SECRET-MARKER-4711" * 1000
    sealed = cipher().seal("wal/x", marker)
    assert b"TOP-SECRET-MARKER" not in sealed


@pytest.mark.parametrize("how", ["flip-header", "flip-body", "flip-tag", "truncate-mid", "truncate-boundary",
                                 "extend", "swap-chunks", "rename"])
def test_tampering_fails_authentication_and_names_the_object(how: str) -> None:
    c = cipher()
    name = "wal/0000000100000000/000000010000000000000003"
    sealed = bytearray(c.seal(name, os.urandom(3 * C + 100)))
    read_as = name
    step = C + crypto.TAG
    if how == "flip-header":
        sealed[20] ^= 1  # in the salt: another object key
    elif how == "flip-body":
        sealed[crypto.HEADER_SIZE + step + 5] ^= 1
    elif how == "flip-tag":
        sealed[-1] ^= 1
    elif how == "truncate-mid":
        del sealed[-50:]
    elif how == "truncate-boundary":
        del sealed[crypto.HEADER_SIZE + 2 * step:]
    elif how == "extend":
        sealed += b"\0" * 16
    elif how == "swap-chunks":
        a = sealed[crypto.HEADER_SIZE:crypto.HEADER_SIZE + step]
        b = sealed[crypto.HEADER_SIZE + step:crypto.HEADER_SIZE + 2 * step]
        sealed[crypto.HEADER_SIZE:crypto.HEADER_SIZE + 2 * step] = b + a
    else:
        read_as = "wal/0000000100000000/000000010000000000000004"
    with pytest.raises(IntegrityError, match="fails authentication|truncated|corrupt") as e:
        c.open_bytes(read_as, bytes(sealed))
    assert read_as in str(e.value)
    with pytest.raises(IntegrityError):
        c.opening_reader(read_as, io.BytesIO(bytes(sealed))).read()


def test_another_repository_key_fails() -> None:
    sealed = cipher().seal("k", b"x" * 100)
    with pytest.raises(IntegrityError, match="fails authentication"):
        cipher().open_bytes("k", sealed)


# --------------------------------------------------------------------------- keys

def key_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> Path:
    p = tmp_path / "repo.key"
    p.write_bytes(content)
    p.chmod(mode)
    return p


@pytest.mark.parametrize("form", ["raw", "hex", "base64"])
def test_key_file_forms(tmp_path: Path, form: str) -> None:
    import base64

    k = os.urandom(32)
    content = {"raw": k, "hex": k.hex().encode() + b"\n", "base64": base64.b64encode(k) + b"\n"}[form]
    assert keys.read_key_file(str(key_file(tmp_path, content)), "encryption_key_file").secret == k


def test_key_file_readable_by_others_or_short_is_refused(tmp_path: Path) -> None:
    p = key_file(tmp_path, os.urandom(32).hex().encode(), 0o644)
    with pytest.raises(ConfigError, match="accessible by group or others.*644") as e:
        keys.read_key_file(str(p), "encryption_key_file")
    assert e.value.hint == f"chmod 600 {p}"
    p.chmod(0o600)
    p.write_bytes(b"too short")
    with pytest.raises(ConfigError, match="does not hold a 32-byte key"):
        keys.read_key_file(str(p), "encryption_key_file")
    with pytest.raises(ConfigError, match="does not exist"):
        keys.read_key_file(str(tmp_path / "nope"), "PITR_ENCRYPTION_KEY_FILE")


def test_wrap_unwrap_and_wrong_keys(tmp_path: Path) -> None:
    dk = os.urandom(32)
    good = keys.passphrase_source("correct horse", "PITR_ENCRYPTION_PASSPHRASE")
    section = keys.wrap(dk, good)
    assert dk.hex() not in json.dumps(section) and "correct horse" not in json.dumps(section)
    assert keys.unwrap(section, good, "repo") == dk
    with pytest.raises(EncryptionKeyError, match="does not open the repository"):
        keys.unwrap(section, keys.passphrase_source("wrong", "PITR_ENCRYPTION_PASSPHRASE"), "repo")
    kf = keys.KeySource("key-file", "key file /k (encryption_key_file)", os.urandom(32))
    with pytest.raises(EncryptionKeyError, match="encrypted with a passphrase"):
        keys.unwrap(section, kf, "repo")
    # a damaged wrapped key with the right key is corruption, not a wrong key
    bad = dict(section, wrapped_key=section["wrapped_key"][:-4] + "AAA=")
    with pytest.raises(IntegrityError, match="damaged"):
        keys.unwrap(bad, good, "repo")


# --------------------------------------------------------------------------- the repository layer

def make_encrypted_repo(tmp_path: Path) -> tuple[FsStorage, keys.KeySource]:
    from pitr.ops.admin.init import init_repo

    root = tmp_path / "repo"
    inner = FsStorage(root)
    src = keys.passphrase_source("pw", "PITR_ENCRYPTION_PASSPHRASE")
    info = ServerInfo(150010, 7300000000000000001, 16 << 20, "/data", False)
    r = init_repo(RepoStorage(inner, src), info, encrypt=True)
    assert r.created and r.encrypted
    return inner, src


def test_encrypted_repo_refuses_without_key_before_reading_objects(tmp_path: Path) -> None:
    inner, src = make_encrypted_repo(tmp_path)
    RepoStorage(inner, src).put("wal/x", b"hello")
    doc = json.loads((tmp_path / "repo" / META_KEY).read_bytes())
    assert doc["format"] == 2 and doc["system_identifier"] == "0" and "7300000000000000001" not in json.dumps(doc)
    reads: list[str] = []

    class Spy(FsStorage):
        def open(self, key: str):  # type: ignore[no-untyped-def]
            reads.append(key)
            return super().open(key)

    spy = Spy(tmp_path / "repo")
    for s in (RepoStorage(spy, None, "nowhere"), RepoStorage(spy, keys.passphrase_source("no", "X"))):
        with pytest.raises(EncryptionKeyError):
            read_meta(s)
        with pytest.raises(EncryptionKeyError):
            s.get("wal/x")
        with pytest.raises(EncryptionKeyError):
            s.put("wal/y", b"clear text")
    assert set(reads) <= {META_KEY}
    assert not (tmp_path / "repo" / "wal" / "y").exists()
    # the bare backend (a path that forgot the key) is refused by read_meta rather than writing in clear
    with pytest.raises(EncryptionKeyError, match="without its key"):
        read_meta(inner)
    assert read_meta(RepoStorage(inner, src)).system_identifier == 7300000000000000001


def test_init_encrypt_refusals(tmp_path: Path) -> None:
    from pitr.ops.admin.init import init_repo

    info = ServerInfo(150010, 7300000000000000001, 16 << 20, "/data", False)
    plain = FsStorage(tmp_path / "plain")
    init_repo(RepoStorage(plain, None), info)
    before = (tmp_path / "plain" / META_KEY).read_bytes()
    with pytest.raises(EncryptionKeyError, match="already exists unencrypted") as e:
        init_repo(RepoStorage(plain, keys.passphrase_source("pw", "P")), info, encrypt=True)
    assert "new prefix" in (e.value.hint or "")
    assert (tmp_path / "plain" / META_KEY).read_bytes() == before
    # init again on an encrypted repository (with or without --encrypt): a no-op that needs the key
    inner, src = make_encrypted_repo(tmp_path)
    body = (tmp_path / "repo" / META_KEY).read_bytes()
    for enc in (True, False):
        r = init_repo(RepoStorage(inner, src), info, encrypt=enc)
        assert not r.created and r.encrypted
        with pytest.raises(EncryptionKeyError):
            init_repo(RepoStorage(inner, None, "nowhere"), info, encrypt=enc)
    assert (tmp_path / "repo" / META_KEY).read_bytes() == body
    with pytest.raises(EncryptionKeyError, match="needs a key"):
        init_repo(RepoStorage(FsStorage(tmp_path / "new"), None, "somewhere"), info, encrypt=True)
    assert not (tmp_path / "new" / META_KEY).exists()


def test_key_rotate_rewraps(tmp_path: Path) -> None:
    from pitr.ops.admin.keys import rotate

    inner, old = make_encrypted_repo(tmp_path)
    RepoStorage(inner, old).put("backups/b/manifest", b"m" * 100_000)
    new = keys.KeySource("key-file", "key file (--new-key-file)", os.urandom(32))
    assert rotate(RepoStorage(inner, old), new).kind == "key-file"
    assert RepoStorage(inner, new).get("backups/b/manifest") == b"m" * 100_000
    with pytest.raises(EncryptionKeyError):
        RepoStorage(inner, old).get("backups/b/manifest")
    # a wrong current key rotates nothing
    before = (tmp_path / "repo" / META_KEY).read_bytes()
    with pytest.raises(EncryptionKeyError, match="does not open"):
        rotate(RepoStorage(inner, keys.KeySource("key-file", "key file x", os.urandom(32))), old)
    assert (tmp_path / "repo" / META_KEY).read_bytes() == before


def test_memory_backend_through_the_layer() -> None:
    s = RepoStorage(MemoryStorage(), None)
    s.adopt(os.urandom(32), b"{}")
    s.put("a/b", io.BytesIO(b"z" * (5 * C + 3)))
    assert s.stat("a/b").size == 5 * C + 3  # type: ignore[union-attr]
    assert [o.size for o in s.list("a/")] == [5 * C + 3]
    assert b"zzzz" not in s.inner.get("a/b")  # type: ignore[attr-defined]


def test_a_format_1_reader_asks_for_an_upgrade(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What an older pitr (reading up to format 1) does with an encrypted repository's pitr.json."""
    from pitr.repo import meta

    make_encrypted_repo(tmp_path)
    monkeypatch.setattr(meta, "MAX_FORMAT_VERSION", 1)
    with pytest.raises(IntegrityError, match="uses format 2; this pitr reads up to 1") as e:
        meta.RepoMeta.from_json((tmp_path / "repo" / META_KEY).read_bytes())
    assert e.value.hint == "upgrade pitr"


def test_wal_push_repush_and_conflict_in_an_encrypted_repo(tmp_path: Path) -> None:
    """The identical-re-push check reads the stored trailer through the cipher (a ranged read from the end)."""
    from pitr.errors import ConflictError
    from pitr.ops.wal import archive
    from pitr.repo.envelope import Codec
    from pitr.repo.format import wal_key
    from tests.support.walgen import SYSID, segment

    inner, src = make_encrypted_repo(tmp_path)  # its cluster is walgen's SYSID
    assert SYSID == 7300000000000000001
    s = RepoStorage(inner, src)
    meta = read_meta(s)
    name = "000000010000000000000003"
    wal = tmp_path / name
    first = segment(name)
    wal.write_bytes(first)
    assert archive.push(s, meta, wal, Codec("none", 0)).status == "stored"
    stored = (tmp_path / "repo" / wal_key(name)).read_bytes()
    assert stored.startswith(crypto.MAGIC) and first[100:200] not in stored
    assert archive.push(RepoStorage(inner, src), meta, wal, Codec("zstd", 3)).status == "already-archived"
    wal.write_bytes(segment(name, seed=1))
    with pytest.raises(ConflictError):
        archive.push(RepoStorage(inner, src), meta, wal, Codec("none", 0))
    assert (tmp_path / "repo" / wal_key(name)).read_bytes() == stored
    out = tmp_path / "fetched"
    archive.fetch(RepoStorage(inner, src), meta, name, out)
    assert out.read_bytes() == first


def test_every_command_opens_its_repository_with_the_key_layer() -> None:
    """A bare backend in a command would write clear text into an encrypted repository: only
    cli/repoopen.open_repo may call open_storage (it wraps the backend in RepoStorage)."""
    root = Path(__file__).resolve().parent.parent / "pitr"
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "open_storage(" in p.read_text() and p.relative_to(root).as_posix()
                 not in ("storage/__init__.py", "cli/repoopen.py")]
    assert offenders == [], f"use pitr.cli.repoopen.open_repo instead of open_storage in {offenders}"
