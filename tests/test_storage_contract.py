"""One contract suite for every storage backend (fs, memory, S3 on a real moto server).

The contract is the docstring of pitr/storage/base.py: atomic puts, if_absent never replaces and
lets exactly one racer win, NotFoundError vs RepoMissingError, sorted listing with sizes.
"""

from __future__ import annotations

import io
import os
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pitr.errors import AlreadyExistsError, NotFoundError, RepoMissingError, StorageError
from pitr.storage.base import Storage
from pitr.storage.fs import TMP_PREFIX, FsStorage
from pitr.storage.memory import MemoryStorage
from pitr.storage.s3 import S3Storage
from tests.support.pg import make_tmpdir, rmtree_pg, run_as_postgres
from tests.support.s3 import MotoServer

MiB = 1 << 20


@pytest.fixture
def s3_env(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    for k, v in moto_server.env().items():
        monkeypatch.setenv(k, v)
    return moto_server


def make_s3(server: MotoServer, bucket: str, prefix: str = "repo/one", **kw: object) -> S3Storage:
    return S3Storage(bucket, prefix, endpoint=server.endpoint, **kw)  # type: ignore[arg-type]


def encrypted(inner: Storage) -> Storage:
    """The same backend seen through an encrypted repository's layer (the contract holds in plaintext terms)."""
    from pitr.repo.sealed import RepoStorage

    s = RepoStorage(inner, None)
    s.adopt(os.urandom(32), b"{}")
    return s


@pytest.fixture(params=["fs", "memory", "s3", "fs-encrypted", "s3-encrypted"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param.endswith("-encrypted"):
        if request.param == "fs-encrypted":
            root = tmp_path / "repo"
            root.mkdir()
            inner: Storage = FsStorage(root)
        else:
            inner = make_s3(request.getfixturevalue("s3_env"), request.getfixturevalue("s3_bucket"), part_size=5 * MiB)
        yield encrypted(inner)
        inner.close()
    elif request.param == "fs":
        root = tmp_path / "repo"
        root.mkdir()
        yield FsStorage(root)
    elif request.param == "memory":
        yield MemoryStorage()
    else:
        server = request.getfixturevalue("s3_env")
        s = make_s3(server, request.getfixturevalue("s3_bucket"), part_size=5 * MiB)
        yield s
        s.close()


class Trickle(io.RawIOBase):
    """A non-seekable stream of unknown length that returns short reads, like a pipe."""

    def __init__(self, data: bytes, step: int = 300_000) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self._step, len(self._data) - self._pos)
        b[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


def test_put_get_stat(store: Storage) -> None:
    store.put("a/b/one", b"first object")
    store.put("a/two", io.BytesIO(b"from a stream"))
    store.put("empty", b"")
    assert store.get("a/b/one") == b"first object"
    with store.open("a/two") as f:
        assert f.read() == b"from a stream"
    assert store.get("empty") == b""
    info = store.stat("a/b/one")
    assert info is not None and info.key == "a/b/one" and info.size == len(b"first object") and info.mtime > 1.6e9
    assert store.stat("a/b/none") is None


def test_put_replaces_without_if_absent(store: Storage) -> None:
    store.put("k", b"old")
    store.put("k", b"new and longer")
    assert store.get("k") == b"new and longer"


def test_list_is_sorted_by_key_with_sizes_and_prefix(store: Storage) -> None:
    keys = ["wal/00000001000000A0/x2", "wal/0000000100000009/x1", "backups/B/manifest", "wal/history/00000002.history",
            "pitr.json", "wal/0000000100000009/x0", "backups/A/data/000001"]
    for i, k in enumerate(keys):
        store.put(k, b"x" * i)
    assert [(o.key, o.size) for o in store.list()] == sorted((k, i) for i, k in enumerate(keys))
    assert [o.key for o in store.list("wal/")] == sorted(k for k in keys if k.startswith("wal/"))
    assert [o.key for o in store.list("wal/0000000100000009/")] == ["wal/0000000100000009/x0",
                                                                     "wal/0000000100000009/x1"]
    assert [o.key for o in store.list("wal/000000010000000")] == ["wal/0000000100000009/x0",
                                                                   "wal/0000000100000009/x1"]
    assert [o.key for o in store.list("backups/A")] == ["backups/A/data/000001"]
    assert list(store.list("nothing/here/")) == []


def test_get_range(store: Storage) -> None:
    data = bytes(range(256)) * 4
    store.put("r", data)
    assert store.get_range("r", 0, 10) == data[:10]
    assert store.get_range("r", 100, 50) == data[100:150]
    assert store.get_range("r", 1000) == data[1000:]
    assert store.get_range("r", -48) == data[-48:]
    assert store.get_range("r", 1020, 100) == data[1020:]  # past the end: what there is
    store.put("tiny", b"abc")
    assert store.get_range("tiny", -48) == b"abc"  # suffix longer than the object: the whole object


def test_missing_key_is_not_found(store: Storage) -> None:
    store.put("present", b"1")
    for call in (lambda: store.get("absent"), lambda: store.open("absent"), lambda: store.get_range("absent", -48)):
        with pytest.raises(NotFoundError) as e:
            call()
        assert not isinstance(e.value, RepoMissingError)
    assert store.stat("absent") is None


def test_if_absent_never_replaces(store: Storage) -> None:
    store.put("wal/seg", b"original", if_absent=True)
    with pytest.raises(AlreadyExistsError):
        store.put("wal/seg", b"imposter", if_absent=True)
    with pytest.raises(AlreadyExistsError):
        store.put("wal/seg", io.BytesIO(b"imposter stream"), if_absent=True)
    assert store.get("wal/seg") == b"original"


def test_racing_if_absent_writers_exactly_one_wins(store: Storage) -> None:
    n = 8
    barrier = threading.Barrier(n)
    payloads = [f"writer {i} ".encode() * 1000 for i in range(n)]

    def race(i: int) -> bool:
        barrier.wait()
        try:
            store.put("race/key", payloads[i], if_absent=True)
            return True
        except AlreadyExistsError:
            return False

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(race, range(n)))
    assert results.count(True) == 1, results
    assert store.get("race/key") == payloads[results.index(True)]


def test_racing_large_if_absent_writers_exactly_one_wins(store: Storage) -> None:
    """Streams over the S3 part size (multipart there).

    On S3 the guarantee is the server's: both writers pass the existence check and race to
    complete with If-None-Match, which AWS evaluates atomically. Moto alone checks it
    non-atomically; the test server serialises conditional writes (tests/support/moto_proc.py)
    so it keeps AWS's promise and this race runs against it too.
    """
    n = 3
    barrier = threading.Barrier(n)
    payloads = [os.urandom(6 * MiB) for _ in range(n)]

    def race(i: int) -> bool:
        barrier.wait()
        try:
            store.put("race/big", io.BytesIO(payloads[i]), if_absent=True)
            return True
        except AlreadyExistsError:
            return False

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(race, range(n)))
    assert results.count(True) == 1, results
    assert store.get("race/big") == payloads[results.index(True)]


def test_s3_multipart_completion_is_conditional(s3_env: MotoServer, s3_bucket: str) -> None:
    """A writer that lost the race after its existence check is refused at completion, and its
    upload is aborted (no orphaned parts)."""
    s = make_s3(s3_env, s3_bucket, part_size=5 * MiB)
    s.put("wal/seg", b"the winner")
    data = os.urandom(11 * MiB)
    with pytest.raises(AlreadyExistsError):
        s._put_multipart("wal/seg", [data[: 5 * MiB]], io.BytesIO(data[5 * MiB :]), True)  # past the check
    assert s.get("wal/seg") == b"the winner"
    assert not s.client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


def test_delete(store: Storage) -> None:
    store.put("d/1", b"1")
    store.put("d/2", b"2")
    store.put("d/3", b"3")
    store.delete("d/1")
    store.delete("d/1")  # missing is fine
    store.delete("never/existed")
    store.delete_many(["d/2", "d/3", "d/none"])
    assert list(store.list("d/")) == []
    store.put("d/1", b"again", if_absent=True)  # a deleted key is free again
    assert store.get("d/1") == b"again"


def test_large_stream_round_trips(store: Storage) -> None:
    """~12 MiB of unknown length: on S3 with 5 MiB parts this is a 3-part multipart upload."""
    data = os.urandom(12 * MiB + 12345)
    store.put("big/object", io.BufferedReader(Trickle(data)), if_absent=True)
    info = store.stat("big/object")
    assert info is not None and info.size == len(data)
    with store.open("big/object") as f:
        got = bytearray()
        while chunk := f.read(1 << 20):
            got += chunk
    assert got == data
    assert store.get_range("big/object", 6 * MiB, 100) == data[6 * MiB : 6 * MiB + 100]
    with pytest.raises(AlreadyExistsError):
        store.put("big/object", io.BytesIO(os.urandom(11 * MiB)), if_absent=True)
    assert store.get_range("big/object", -100) == data[-100:]
    if isinstance(store, S3Storage):
        head = store.client.head_object(Bucket=store.bucket, Key=store._k("big/object"))
        assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # really multipart, 3 parts


# --------------------------------------------------------------------------- missing repository


def test_missing_repo_is_repo_missing_not_not_found(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    server = request.getfixturevalue("s3_env")
    stores: list[Storage] = [FsStorage(tmp_path / "no-such-dir"),
                             make_s3(server, "pitr-no-such-bucket", max_attempts=1)]

    def calls(s: Storage) -> list[Callable[[], object]]:
        return [lambda: s.get("pitr.json"), lambda: s.stat("pitr.json"), lambda: list(s.list("wal/")),
                lambda: s.put("pitr.json", b"{}"), lambda: s.put("x", b"{}", if_absent=True), s.check]

    for s in stores:
        for call in calls(s):
            with pytest.raises(RepoMissingError) as e:
                call()
            assert "does not exist" in str(e.value) and e.value.hint, s.display
    assert not (tmp_path / "no-such-dir").exists()  # put did not create it either


def test_s3_endpoint_down_is_a_storage_error(s3_env: MotoServer, s3_bucket: str) -> None:
    s = make_s3(s3_env, s3_bucket, max_attempts=1)
    s.put("k", b"v")
    s3_env.outage()
    try:
        for call in (lambda: s.get("k"), lambda: s.stat("k"), lambda: s.put("k2", b"v", if_absent=True)):
            with pytest.raises(StorageError) as e:
                call()
            assert not isinstance(e.value, NotFoundError)
            assert f"cannot reach the S3 endpoint {s3_env.endpoint}" in str(e.value)
    finally:
        s3_env.recover()
    assert s.get("k") == b"v"


def test_s3_uploads_carry_their_sha256_for_the_server_to_verify(s3_env: MotoServer, s3_bucket: str) -> None:
    """Every PutObject / UploadPart sends x-amz-checksum-sha256 of its body (AWS and MinIO reject a
    mismatch; moto does not check, so the header itself is what is verified here)."""
    import base64
    import hashlib

    s = make_s3(s3_env, s3_bucket, part_size=5 * MiB)
    sent: list[tuple[str, bytes, bytes]] = []

    def capture(request, **_: object) -> None:  # type: ignore[no-untyped-def]
        body = request.body if isinstance(request.body, bytes) else request.body.read()
        if hasattr(request.body, "seek"):
            request.body.seek(0)
        sent.append((request.url, request.headers.get("x-amz-checksum-sha256", b""), body))

    for op in ("PutObject", "UploadPart"):
        s.client.meta.events.register(f"before-send.s3.{op}", capture)
    s.put("small", b"tiny object")
    big = os.urandom(11 * MiB)
    s.put("big", io.BytesIO(big))
    assert len(sent) == 4  # one put, three parts
    for url, checksum, body in sent:
        assert checksum and base64.b64decode(checksum) == hashlib.sha256(body).digest(), url
    parts = [big[i : i + 5 * MiB] for i in range(0, len(big), 5 * MiB)]
    composite = hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in parts)).digest()
    head = s.client.head_object(Bucket=s3_bucket, Key=s._k("big"), ChecksumMode="ENABLED")
    assert base64.b64decode(head["ChecksumSHA256"].split("-")[0]) == composite


def test_s3_listing_paginates_past_1000(s3_env: MotoServer, s3_bucket: str) -> None:
    s = make_s3(s3_env, s3_bucket, max_connections=16)
    keys = [f"wal/0000000100000000/{i:024X}" for i in range(1100)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s.put(k, b"."), keys))
    make_s3(s3_env, s3_bucket, prefix="repo/other").put("wal/0000000100000000/foreign", b"not ours")
    listed = [o.key for o in s.list("wal/")]
    assert listed == keys  # all of them, in order, prefix stripped, nothing from the other prefix


# --------------------------------------------------------------------------- filesystem specifics


def test_fs_objects_are_read_only_and_no_temp_files_are_listed(tmp_path: Path) -> None:
    s = FsStorage(tmp_path)
    s.put("wal/x/seg", b"data", if_absent=True)
    s.put("pitr.json", b"{}")
    for key in ("wal/x/seg", "pitr.json"):
        assert stat.S_IMODE((tmp_path / key).stat().st_mode) == 0o440
    assert sorted(p.name for p in (tmp_path / "wal/x").iterdir()) == ["seg"]  # temp file gone
    # a crash mid-write leaves a temp file: never visible as an object
    (tmp_path / "wal/x" / f"{TMP_PREFIX}seg2.deadbeef").write_bytes(b"half")
    assert [o.key for o in s.list()] == ["pitr.json", "wal/x/seg"]
    assert s.stat("wal/x/seg2") is None


def test_fs_failed_put_leaves_nothing(tmp_path: Path) -> None:
    class Boom(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, b: memoryview) -> int:  # type: ignore[override]
            raise OSError(5, "Input/output error")

    s = FsStorage(tmp_path)
    with pytest.raises(StorageError):
        s.put("wal/x/seg", io.BufferedReader(Boom()))
    assert s.stat("wal/x/seg") is None
    assert [p.name for p in (tmp_path / "wal/x").iterdir()] == []


def test_fs_concurrent_reader_never_sees_partial_object(tmp_path: Path) -> None:
    s = FsStorage(tmp_path)
    data = os.urandom(4 * MiB)
    stop = threading.Event()
    seen: list[int] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(len(s.get("obj")))
            except NotFoundError:
                pass

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(10):
            s.put("obj", data)
    finally:
        stop.set()
        t.join()
    assert seen and set(seen) == {len(data)}


def test_fs_unwritable_directory_is_a_clear_storage_error() -> None:
    """As the postgres user (root ignores permissions): a root-owned repo cannot be written."""
    d = make_tmpdir()
    try:
        repo = d / "repo"
        repo.mkdir(mode=0o755)  # owned by root: postgres may read, not write
        (repo / "pitr.json").write_text("{}")
        code = ("import sys\nfrom pathlib import Path\nfrom pitr.storage.fs import FsStorage\n"
                "from pitr.errors import StorageError\n"
                "s = FsStorage(Path(sys.argv[1]))\nassert s.get('pitr.json') == b'{}'\n"
                "for call in (lambda: s.put('wal/k', b'x'), lambda: s.check(write=True)):\n"
                "    try:\n        call()\n    except StorageError as e:\n        print(f'{e}|{e.hint}')\n"
                "    else:\n        print('no error')\n")
        proc = run_as_postgres([sys.executable, "-c", code, repo], cwd="/tmp")
        lines = proc.stdout.splitlines()
        assert len(lines) == 2, proc.stdout + proc.stderr
        assert lines[0].startswith(f"cannot write wal/k in repository directory {repo}: Permission denied|")
        assert "not writable by this user" in lines[1]
        assert all("postgres" in line.split("|")[1] for line in lines)
        assert sorted(p.name for p in repo.iterdir()) == ["pitr.json"]
        # a parent the user cannot enter is a permission problem, not "does not exist"
        hidden = d / "locked" / "repo"
        hidden.mkdir(parents=True)
        (d / "locked").chmod(0o700)
        code = ("import sys\nfrom pathlib import Path\nfrom pitr.storage.fs import FsStorage\n"
                "from pitr.errors import RepoMissingError, StorageError\n"
                "try:\n    FsStorage(Path(sys.argv[1])).check()\n"
                "except RepoMissingError as e:\n    print('missing', e)\n"
                "except StorageError as e:\n    print('storage', e)\n")
        out = run_as_postgres([sys.executable, "-c", code, hidden], cwd="/tmp").stdout
        assert out.startswith(f"storage repository directory {hidden} cannot be reached by this user"), out
    finally:
        rmtree_pg(d)


def test_fs_invalid_keys_are_refused(tmp_path: Path) -> None:
    s = FsStorage(tmp_path / "repo")
    (tmp_path / "repo").mkdir()
    for key in ("", "/etc/passwd", "../outside", "a/../../outside"):
        with pytest.raises(StorageError):
            s.put(key, b"x")
    assert not (tmp_path / "outside").exists()


def _refuse(s: S3Storage, op: str, code: str) -> None:
    """Make S3 answer `op` with a 403 error `code` (a bucket policy without that permission)."""
    from types import SimpleNamespace

    def answer(**_: object) -> tuple[object, dict[str, object]]:
        return (SimpleNamespace(status_code=403, headers={}),
                {"Error": {"Code": code, "Message": "denied"}, "ResponseMetadata": {"HTTPStatusCode": 403}})

    s.client.meta.events.register(f"before-call.s3.{op}", answer)


def test_s3_optional_listings_denied_warn_and_go_on(s3_env: MotoServer, s3_bucket: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Without s3:ListBucketVersions / s3:ListBucketMultipartUploads the checks that need them are skipped
    with a warning naming the grant; any other refusal of those listings is an error."""
    s = make_s3(s3_env, s3_bucket)
    s.put("k", b"v")
    _refuse(s, "ListObjectVersions", "AccessDenied")
    _refuse(s, "ListMultipartUploads", "AccessDenied")
    with caplog.at_level("WARNING", logger="pitr.storage"):
        assert list(s.rewritten("", lambda k: True)) == []
        assert list(s.stale_temps(0, 1e12)) == []
    warned = [r.getMessage() for r in caplog.records]
    assert any("cannot list object versions" in w and "grant s3:ListBucketVersions" in w for w in warned), warned
    assert any("cannot list incomplete multipart uploads" in w and "s3:ListBucketMultipartUploads" in w
               for w in warned), warned
    other = make_s3(s3_env, s3_bucket)
    _refuse(other, "ListObjectVersions", "SlowDown")
    with pytest.raises(StorageError, match="list object versions"):
        other.rewritten("", lambda k: True)
    assert s.get("k") == b"v"
