"""S3 backend (boto3, imported lazily): any S3-compatible endpoint.

Every upload carries a SHA-256 content checksum (x-amz-checksum-sha256) that the server verifies
before it stores the object; large streams go up as multipart uploads whose parts each carry
their own checksum, so a whole large object is never held in memory. Conditional writes use
`If-None-Match: *` on a single PutObject (never a multipart completion, which some stores do not
make atomic). An endpoint that answers it does not implement them is refused, unless the user
accepted the risk (allow_unsafe_store: trust_conditional=False), and then, as for a store that
ignores the header, every conditional write looks first (HEAD) and its caller reads back after.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO

from pitr.errors import AlreadyExistsError, ConfigError, NotFoundError, RepoMissingError, StorageError
from pitr.storage.base import UNSAFE_STORE_HINT, ObjectInfo, Storage, TempObject

MiB = 1 << 20
MAX_SINGLE_PUT = 5 << 30  # S3's limit for one PutObject
_PROBE_PREFIXES = (".pitr-check/", ".pitr-write-check/")  # ops/admin/storecheck.py and check(): never locked
MULTIPART_GRACE = 86400.0  # an incomplete multipart upload started longer ago is abandoned (expire aborts it)
PARTS_IN_FLIGHT = 2  # per multipart upload; with --jobs uploads at once this bounds backup memory
_CONN_HINT = "check that the S3 endpoint is up and that --s3-endpoint / PITR_S3_ENDPOINT is right"
_CRED_HINT = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / an instance role) "
              "for the user running pitr")


def _b64sha256(data: bytes | memoryview) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


class _Body(io.RawIOBase):
    """A botocore StreamingBody as a raw stream, with errors translated."""

    def __init__(self, body: Any, owner: S3Storage, key: str) -> None:
        self._body = body
        self._owner = owner
        self._key = key

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        try:
            data = self._body.read(len(b))
        except Exception as e:  # noqa: BLE001 - botocore/urllib3 errors vary
            raise self._owner._translate(e, f"read {self._key}") from e
        n = len(data)
        b[:n] = data
        return n

    def close(self) -> None:
        try:
            self._body.close()
        finally:
            super().close()


def _client_setup_error(e: Exception, endpoint: str | None) -> ConfigError:
    """Why boto3 could not even build a client (a bad AWS_PROFILE, endpoint or AWS config file)."""
    from botocore import exceptions as bx  # type: ignore[import-untyped]

    if isinstance(e, bx.ProfileNotFound):
        var = "AWS_PROFILE" if os.environ.get("AWS_PROFILE") else "AWS_DEFAULT_PROFILE"
        return ConfigError(f"the AWS profile {e.kwargs.get('profile')!r} named by {var} does not exist in this "
                           "user's AWS config or credentials file",
                           f"fix or unset {var}, or add the profile to ~/.aws/config (AWS_CONFIG_FILE)")
    if isinstance(e, ValueError) and "endpoint" in str(e).lower():
        return ConfigError(f"the S3 endpoint {endpoint!r} is not a valid URL",
                           "give --s3-endpoint / PITR_S3_ENDPOINT as http(s)://host[:port]")
    return ConfigError(f"the S3 client cannot be set up from this environment: {e}",
                       "check the AWS_* environment variables and ~/.aws/config of the user running pitr")


class S3Storage(Storage):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        addressing: str = "auto",
        ca_bundle: str | None = None,
        part_size: int = 8 * MiB,
        max_connections: int = 10,
        max_attempts: int = 4,
        trust_conditional: bool = True,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint = endpoint
        self.display = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.part_size = max(5 * MiB, part_size)
        self._region = region
        self._addressing = addressing
        self._ca_bundle = ca_bundle
        self._max_connections = max_connections
        self._max_attempts = max_attempts
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._conditional = True  # the endpoint accepts If-None-Match (it may still ignore it)
        self._bucket_ok = False
        # False: the user accepted a store that failed the conditional-create test (allow_unsafe_store)
        self.conditional_writes_trusted = trust_conditional
        #: (S3 mode GOVERNANCE|COMPLIANCE, days): every put carries this Object Lock retention (set from
        #: pitr.json's lock_days/lock_mode when the repository is opened); deletes then go by version
        self.retention: tuple[str, int] | None = None
        #: (key, retained until) of versions a delete left because their lock has not expired
        self.locked_left: list[tuple[str, datetime]] = []

    def native(self) -> S3Storage:
        if self.conditional_writes_trusted:
            return self
        return S3Storage(self.bucket, self.prefix, endpoint=self.endpoint, region=self._region,
                         addressing=self._addressing, ca_bundle=self._ca_bundle, part_size=self.part_size,
                         max_connections=self._max_connections, max_attempts=self._max_attempts)

    # --- client
    @property
    def client(self) -> Any:
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def _make_client(self) -> Any:
        import boto3  # type: ignore[import-untyped]
        from botocore.config import Config  # type: ignore[import-untyped]

        style = self._addressing
        if style == "auto":
            style = "path" if self.endpoint else "virtual"
        region = self._region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        cfg = Config(
            retries={"max_attempts": self._max_attempts, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            max_pool_connections=self._max_connections,
            s3={"addressing_style": style},
            # we send our own SHA-256 with every upload; don't add a second checksum pass
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        try:
            session = boto3.session.Session()
            return session.client(
                "s3",
                endpoint_url=self.endpoint or None,
                region_name=region or "us-east-1",
                verify=self._ca_bundle or None,
                config=cfg,
            )
        except Exception as e:  # noqa: BLE001 - the environment's fault, not pitr's: say which setting
            raise _client_setup_error(e, self.endpoint) from e

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    # --- error translation (the one place botocore errors become PitrErrors)
    def _translate(self, e: BaseException, what: str) -> Exception:
        from botocore import exceptions as bx  # type: ignore[import-untyped]

        where = self.endpoint or "AWS S3"
        if isinstance(e, bx.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                return RepoMissingError(
                    f"S3 bucket {self.bucket!r} does not exist at {where}",
                    "create the bucket or fix --repo / PITR_REPO",
                )
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return NotFoundError(f"cannot {what}: no such object in {self.display}")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
                return AlreadyExistsError(f"cannot {what}: the object already exists")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
                return StorageError(f"S3 refused access to {self.display} ({code}) while trying to {what}", _CRED_HINT)
            msg = err.get("Message") or code
            return StorageError(f"S3 error while trying to {what} in {self.display}: {msg} ({code})")
        if isinstance(e, bx.NoCredentialsError | bx.PartialCredentialsError):
            return StorageError("no S3 credentials were found", _CRED_HINT)
        if isinstance(e, bx.SSLError):
            return StorageError(
                f"TLS verification failed talking to {where}: {e}",
                "pass the endpoint's CA with s3_ca_bundle (or AWS_CA_BUNDLE)",
            )
        if isinstance(e, bx.EndpointConnectionError | bx.ConnectionClosedError | bx.ConnectTimeoutError
                      | bx.ReadTimeoutError | bx.ConnectionError):
            return StorageError(f"cannot reach the S3 endpoint {where} (while trying to {what})", _CONN_HINT)
        if isinstance(e, bx.BotoCoreError):
            return StorageError(f"S3 client error while trying to {what}: {e}")
        if isinstance(e, OSError):
            return StorageError(f"network error talking to {where} while trying to {what}: {e}", _CONN_HINT)
        return e if isinstance(e, Exception) else StorageError(str(e))

    def _call(self, what: str, fn: Any, **kw: Any) -> Any:
        try:
            return fn(**kw)
        except Exception as e:  # noqa: BLE001
            err = self._translate(e, what)
            if isinstance(err, NotFoundError) and not self._bucket_ok:
                self._check_bucket()
            raise err from e

    def _check_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            self._bucket_ok = True
        except Exception as e:  # noqa: BLE001
            err = self._translate(e, "open the bucket")
            if isinstance(err, NotFoundError):
                raise RepoMissingError(
                    f"S3 bucket {self.bucket!r} does not exist at {self.endpoint or 'AWS S3'}",
                    "create the bucket or fix --repo / PITR_REPO",
                ) from e
            raise err from e

    # --- interface
    def put(self, key: str, data: bytes | BinaryIO, *, if_absent: bool = False) -> None:
        if isinstance(data, bytes | bytearray | memoryview):
            # a conditional create goes up in one PUT: a conditional multipart completion is not
            # atomic on every store (two racers both acknowledged), a conditional PutObject is
            if len(data) <= self.part_size or (if_absent and len(data) <= MAX_SINGLE_PUT):
                self._put_small(key, bytes(data), if_absent, retain=True)
                return
            data = io.BytesIO(data)
        first = data.read(self.part_size)
        if len(first) < self.part_size:
            self._put_small(key, first, if_absent, retain=True)
            return
        if if_absent and self.stat(key) is not None:
            raise AlreadyExistsError(f"object {key} already exists")
        head = [first]
        del first  # the part list below is the only reference, so the part is freed once sent
        self._put_multipart(key, head, data, if_absent)

    def _lock_args(self) -> dict[str, Any]:
        if self.retention is None:
            return {}
        mode, days = self.retention
        # a minute over: the retention is at least N days from the moment the object lands
        return {"ObjectLockMode": mode,
                "ObjectLockRetainUntilDate": datetime.now(UTC) + timedelta(days=days, minutes=1)}

    def _retain(self, key: str) -> bool:
        # conformance probes (check --storage, init) are deleted at once: never lock them
        return self.retention is not None and not key.startswith(_PROBE_PREFIXES)

    def _put_small(self, key: str, body: bytes, if_absent: bool, retain: bool = False) -> None:
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": self._k(key), "Body": body,
                              "ChecksumSHA256": _b64sha256(body)}
        if retain and self._retain(key):  # probes (check, checksum test) are never locked
            # S3 wants the checksum's algorithm named on a locked upload (x-amz-sdk-checksum-algorithm)
            kw |= self._lock_args() | {"ChecksumAlgorithm": "SHA256"}
        if if_absent and not self.conditional_writes_trusted and self.stat(key) is not None:
            raise AlreadyExistsError(f"object {key} already exists")
        if if_absent and self._conditional:
            kw["IfNoneMatch"] = "*"
        try:
            self.client.put_object(**kw)
        except Exception as e:  # noqa: BLE001
            from botocore.exceptions import ClientError  # type: ignore[import-untyped]

            if if_absent and isinstance(e, ClientError) and e.response.get("Error", {}).get("Code") in (
                "NotImplemented", "InvalidArgument"
            ) and "IfNoneMatch" in kw:
                if self.conditional_writes_trusted:
                    raise StorageError(
                        f"the S3 endpoint {self.endpoint or 'AWS S3'} does not support conditional writes "
                        "(If-None-Match), which pitr needs so that nothing archived is ever overwritten",
                        UNSAFE_STORE_HINT) from None
                # accepted (allow_unsafe_store): the look-before-write above is all there is
                self._conditional = False
                self._put_small(key, body, if_absent, retain)
                return
            err = self._translate(e, f"write {key}")
            if isinstance(err, NotFoundError):
                self._check_bucket()
            raise err from e

    def rejects_bad_checksum(self, key: str) -> bool | None:
        body = b"pitr checksum probe"
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=body,
                                   ChecksumSHA256=_b64sha256(body + b"!"))
        except Exception as e:  # noqa: BLE001
            from botocore.exceptions import ClientError  # type: ignore[import-untyped]

            if isinstance(e, ClientError) and e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 400:
                return True  # BadDigest / InvalidRequest: the store checked and refused
            raise self._translate(e, f"write {key}") from e
        return False

    def _put_multipart(self, key: str, head: list[bytes], rest: BinaryIO, if_absent: bool) -> None:
        k = self._k(key)
        up = self._call(f"write {key}", self.client.create_multipart_upload,
                        Bucket=self.bucket, Key=k, ChecksumAlgorithm="SHA256",
                        **(self._lock_args() if self._retain(key) else {}))
        upload_id = up["UploadId"]
        parts: list[dict[str, Any]] = []
        try:
            # PARTS_IN_FLIGHT parts uploading plus the one being read: memory per large object is
            # (PARTS_IN_FLIGHT + 1) * part_size, and a backup runs --jobs of these at once
            with ThreadPoolExecutor(max_workers=PARTS_IN_FLIGHT) as pool:
                futures: deque[Future[dict[str, Any]]] = deque()
                number = 1
                chunk = head.pop()
                while chunk:
                    if len(futures) >= PARTS_IN_FLIGHT:
                        parts.append(futures.popleft().result())
                    futures.append(pool.submit(self._upload_part, key, k, upload_id, number, chunk))
                    number += 1
                    chunk = rest.read(self.part_size)
                for f in futures:
                    parts.append(f.result())
            kw: dict[str, Any] = {"Bucket": self.bucket, "Key": k, "UploadId": upload_id,
                                  "MultipartUpload": {"Parts": parts}}
            if if_absent and self._conditional:
                kw["IfNoneMatch"] = "*"
            done = self._call(f"write {key}", self.client.complete_multipart_upload, **kw)
            if self._retain(key):
                self._ensure_retention(key, k, done.get("VersionId"))
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=k, UploadId=upload_id)
            except Exception:  # noqa: BLE001,S110 - best effort; lifecycle rules clean the rest
                pass
            raise

    def _ensure_retention(self, key: str, k: str, version: str | None) -> None:
        """Some stores (moto) drop the lock given at CreateMultipartUpload: set it on the version then."""
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": k} | ({"VersionId": version} if version else {})
        h = self._call(f"stat {key}", self.client.head_object, **kw)
        if h.get("ObjectLockRetainUntilDate") is None:
            lock = self._lock_args()
            self._call(f"lock {key}", self.client.put_object_retention, **kw,
                       Retention={"Mode": lock["ObjectLockMode"], "RetainUntilDate": lock["ObjectLockRetainUntilDate"]},
                       ChecksumAlgorithm="SHA256")

    def _upload_part(self, key: str, k: str, upload_id: str, number: int, chunk: bytes) -> dict[str, Any]:
        checksum = _b64sha256(chunk)
        r = self._call(f"write {key}", self.client.upload_part, Bucket=self.bucket, Key=k, UploadId=upload_id,
                       PartNumber=number, Body=chunk, ChecksumSHA256=checksum)
        return {"ETag": r["ETag"], "PartNumber": number, "ChecksumSHA256": checksum}

    def open(self, key: str, **version: str) -> BinaryIO:
        """A streaming read (of `version`, a VersionId, when given; storage/s3_asof.py reads through here)."""
        r = self._call(f"read {key}", self.client.get_object, Bucket=self.bucket, Key=self._k(key), **version)
        return io.BufferedReader(_Body(r["Body"], self, key), buffer_size=1 << 20)  # type: ignore[return-value]

    def get_range(self, key: str, start: int, length: int | None = None) -> bytes:
        if start < 0:
            rng = f"bytes={start}"
        elif length is None:
            rng = f"bytes={start}-"
        else:
            if length <= 0:
                return b""
            rng = f"bytes={start}-{start + length - 1}"
        return self.read_range(key, rng, start, length)

    def read_range(self, key: str, rng: str, start: int, length: int | None, **version: str) -> bytes:
        """One ranged GET (of `version`, a VersionId, when given), read whole and checked against the range
        asked for: the one ranged read of this backend and of its as-of view (storage/s3_asof.py)."""
        r = self._call(f"read {key}", self.client.get_object, Bucket=self.bucket, Key=self._k(key), Range=rng,
                       **version)
        body = r["Body"]
        try:
            data = body.read()
        except Exception as e:  # noqa: BLE001
            raise self._translate(e, f"read {key}") from e
        finally:
            body.close()
        return self._checked_range(key, r, data, start, length)

    def _listing_denied(self, e: Exception, what: str, consequence: str) -> None:
        """An optional listing the credentials may not make: a warning naming what is lost and the grant
        (the caller goes on without it); any other failure is raised as the StorageError it is."""
        err = self._translate(e, what)
        if isinstance(err, StorageError) and "refused access" in str(err):
            logging.getLogger("pitr.storage").warning("cannot %s in %s (access denied)%s", what, self.display,
                                                      consequence)
            return
        raise err from e

    def _checked_range(self, key: str, r: dict[str, Any], data: bytes, start: int, length: int | None) -> bytes:
        """The bytes asked for, whatever the endpoint did with the Range header: some (s3rver) read
        a suffix range `bytes=-N` as `bytes=0-N`, others ignore Range and send the whole object."""
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", str(r.get("ContentRange") or ""))
        if m is None:  # the whole object came back
            if start < 0:
                return data[max(0, len(data) + start):]
            return data[start:] if length is None else data[start:start + length]
        first, total = int(m.group(1)), int(m.group(3))
        want = max(0, total + start) if start < 0 else start
        if first == want:
            return data
        if start < 0:  # a misread suffix range: ask again with explicit offsets
            return self.get_range(key, want, total - want)
        raise StorageError(f"the S3 endpoint {self.endpoint or 'AWS S3'} answered a read of {key} from byte "
                           f"{start} with the bytes from {first}")

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            r = self.client.head_object(Bucket=self.bucket, Key=self._k(key))
        except Exception as e:  # noqa: BLE001
            err = self._translate(e, f"stat {key}")
            if isinstance(err, NotFoundError):
                if not self._bucket_ok:
                    self._check_bucket()
                return None
            raise err from e
        return ObjectInfo(key, int(r["ContentLength"]), r["LastModified"].timestamp())

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full = self._k(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        cut = len(self.prefix) + 1 if self.prefix else 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                for o in page.get("Contents", []):
                    yield ObjectInfo(o["Key"][cut:], int(o["Size"]), o["LastModified"].timestamp())
        except Exception as e:  # noqa: BLE001
            raise self._translate(e, "list objects") from e

    def delete(self, key: str) -> None:
        if self.retention is not None:
            self._delete_versions([key])
            return
        self._call(f"delete {key}", self.client.delete_object, Bucket=self.bucket, Key=self._k(key))

    def rewritten(self, prefix: str, want: Callable[[str], bool]) -> Sequence[tuple[str, int, float]]:
        """(key, versions, first written) of each key under prefix (and chosen by want) whose current
        version is not the first one written: overwritten, or deleted and written again. Only a
        versioned bucket keeps the evidence; a deleted key (delete marker newest) is not listed.
        Without permission to list versions: a warning and none."""
        full = self._k(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        cut = len(self.prefix) + 1 if self.prefix else 0
        entries: dict[str, list[tuple[float, bool]]] = {}  # key -> (LastModified, is a delete marker)
        try:
            for page in self.client.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=full):
                for v, marker in [(v, False) for v in page.get("Versions", [])] + [
                        (m, True) for m in page.get("DeleteMarkers", [])]:
                    key = v["Key"][cut:]
                    if want(key):
                        entries.setdefault(key, []).append((v["LastModified"].timestamp(), marker))
        except Exception as e:  # noqa: BLE001
            self._listing_denied(e, "list object versions",
                                 ": overwritten objects are not checked; grant s3:ListBucketVersions")
            return []
        out = []
        for key, vs in sorted(entries.items()):
            vs.sort()
            if len(vs) > 1 and not vs[-1][1]:
                out.append((key, len(vs), vs[0][0]))
        return out

    def object_lock_enabled(self) -> bool:
        """Whether the bucket has Object Lock enabled (it can only be chosen when the bucket is made)."""
        try:
            r = self.client.get_object_lock_configuration(Bucket=self.bucket)
        except Exception as e:  # noqa: BLE001
            from botocore.exceptions import ClientError  # type: ignore[import-untyped]

            if isinstance(e, ClientError) and "ObjectLockConfigurationNotFound" in str(
                    e.response.get("Error", {}).get("Code", "")):
                return False
            raise self._translate(e, "read the bucket's Object Lock configuration") from e
        return r.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"

    def _delete_versions(self, keys: Sequence[str]) -> None:
        """Under an Object Lock policy: delete every version of each key (a plain delete would only add a
        delete marker and free nothing); a version still locked is left and noted in locked_left."""
        from botocore.exceptions import ClientError  # type: ignore[import-untyped]

        for key in keys:
            k = self._k(key)
            try:
                pages = self.client.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=k)
                found = [v["VersionId"] for page in pages
                         for v in page.get("Versions", []) + page.get("DeleteMarkers", []) if v["Key"] == k]
            except Exception as e:  # noqa: BLE001
                raise self._translate(e, f"list the versions of {key}") from e
            for vid in found:
                try:
                    self.client.delete_object(Bucket=self.bucket, Key=k, VersionId=vid)
                except ClientError as e:
                    until = None
                    if e.response.get("Error", {}).get("Code") == "AccessDenied":
                        until = self._retained_until(k, vid)
                    if until is None:  # refused for another reason (permissions): a real failure
                        raise self._translate(e, f"delete {key}") from e
                    self.locked_left.append((key, until))
                except Exception as e:  # noqa: BLE001
                    raise self._translate(e, f"delete {key}") from e

    def _retained_until(self, k: str, vid: str) -> datetime | None:
        try:
            r = self.client.head_object(Bucket=self.bucket, Key=k, VersionId=vid)
            until = r.get("ObjectLockRetainUntilDate")
            return until if isinstance(until, datetime) and until > datetime.now(UTC) else None
        except Exception as e:  # noqa: BLE001
            raise self._translate(e, f"read the retention of {k}") from e

    def delete_many(self, keys: Sequence[str]) -> None:
        if self.retention is not None:
            self._delete_versions(keys)
            return
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._k(k)} for k in keys[i : i + 1000]]
            r = self._call("delete objects", self.client.delete_objects, Bucket=self.bucket,
                           Delete={"Objects": batch, "Quiet": True})
            if r.get("Errors"):
                e = r["Errors"][0]
                raise StorageError(f"S3 could not delete {e.get('Key')}: {e.get('Message') or e.get('Code')}")

    def check(self, write: bool = False) -> None:
        self._check_bucket()
        if write:
            probe = f".pitr-write-check/{os.getpid()}-{threading.get_ident()}"
            self._put_small(probe, b"ok", False)
            self.delete(probe)

    def stale_temps(self, older_than: float, now: float) -> Sequence[TempObject]:
        """Incomplete multipart uploads (a put() killed mid-upload) started over MULTIPART_GRACE and
        older_than ago; their parts are billed but never listed. Without permission to list them:
        a warning and none (expire still does its main work)."""
        limit = max(older_than, MULTIPART_GRACE)  # S3 keeps the start time only; an upload may run for hours
        full = self.prefix + "/" if self.prefix else ""
        cut = len(full)
        out: list[TempObject] = []
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                for u in page.get("Uploads", []):
                    started = u["Initiated"].timestamp()
                    if now - started > limit:
                        out.append(TempObject(u["Key"][cut:], 0, started, u["UploadId"]))
        except Exception as e:  # noqa: BLE001
            self._listing_denied(e, "list incomplete multipart uploads",
                                 "; grant s3:ListBucketMultipartUploads so that expire can abort abandoned ones")
            return []
        return out

    def remove_temps(self, temps: Sequence[TempObject]) -> None:
        for t in temps:
            if t.upload_id is None:
                continue
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._k(t.key), UploadId=t.upload_id)
            except Exception as e:  # noqa: BLE001
                err = self._translate(e, f"abort the incomplete upload of {t.key}")
                if not isinstance(err, NotFoundError):  # NoSuchUpload: finished or aborted meanwhile
                    raise err from e

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
