"""The key hierarchy of an encrypted repository (docs/repository-format.md §9.1).

    key file (32 bytes) ──HKDF-SHA256(salt)──┐
    passphrase ──scrypt(salt, n, r, p)───────┴─▶ key-encryption key (KEK)
    KEK ──AES-256-GCM──▶ wrapped data key (in pitr.json)      KEK ──HMAC──▶ key check (in pitr.json)
    data key (32 random bytes, one per repository) ──HKDF(object salt)──▶ one key per object

The key check tells a wrong key (exit 2, before any object is read) from a damaged wrapped key.
Rotating re-wraps the same data key under a new KEK: one small write, every object stays readable.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pitr.errors import ConfigError, EncryptionKeyError, IntegrityError

CIPHER_NAME = "AES-256-GCM"
# scrypt cost: 2^15 * 8 * 128 bytes = 32 MiB and 0.1-0.5 s of CPU per derivation (every pitr call with a passphrase
# pays it once; a key file costs nothing). Stored per repository, so a later pitr may raise it.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1
_WRAP_AAD = b"pitr data key v1"
_CHECK_MSG = b"pitr key check v1"


@dataclass(frozen=True)
class KeySource:
    """Where the user's key came from and its secret; repr never shows the secret."""

    kind: str  # "key-file" | "passphrase"
    where: str  # for messages: "key file /etc/pitr/repo.key (encryption_key_file)" / "PITR_ENCRYPTION_PASSPHRASE"
    secret: bytes = field(repr=False)


def read_key_file(path: str, setting: str) -> KeySource:
    """Load a key file: 32 raw bytes, or those 32 bytes as 64 hex digits or base64 (surrounding
    whitespace ignored). Refused when group or others may access it, or when it is not 32 bytes."""
    p = Path(path).expanduser()
    where = f"key file {p} ({setting})"
    try:
        st = os.stat(p)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"the {where} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(f"the {where} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):o})",
                              f"chmod 600 {p}")
        data = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"the {where} does not exist", f"create it (e.g. `openssl rand -hex 32 > {p}`) or fix "
                          f"{setting}") from None
    except PermissionError:
        raise ConfigError(f"the {where} is not readable by this user",
                          "make it readable by the OS user running pitr (usually postgres) only") from None
    except OSError as e:
        raise ConfigError(f"the {where} cannot be read: {e.strerror}") from None
    return KeySource("key-file", where, _parse_key(data, where))


def _parse_key(data: bytes, where: str) -> bytes:
    if len(data) == 32:
        return data
    text = data.strip()
    if len(text) == 64:
        try:
            return binascii.unhexlify(text)
        except binascii.Error:
            pass
    try:
        raw = base64.b64decode(text, validate=True)
        if len(raw) == 32:
            return raw
    except binascii.Error:
        pass
    raise ConfigError(f"the {where} does not hold a 32-byte key (32 raw bytes, 64 hex digits or base64)",
                      "create one with `openssl rand -hex 32`")


def passphrase_source(value: str, variable: str) -> KeySource:
    if not value:
        raise ConfigError(f"{variable} is set but empty", f"set a passphrase in {variable} or unset it")
    return KeySource("passphrase", variable, value.encode())


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: Any, what: str) -> bytes:
    try:
        return base64.b64decode(str(s), validate=True)
    except (binascii.Error, ValueError):
        raise IntegrityError(f"repository metadata: {what} is not valid base64") from None


def _kek(source: KeySource, kek: dict[str, Any]) -> bytes:
    salt = _unb64(kek.get("salt", ""), "the key salt")
    if kek.get("source") == "passphrase":
        if kek.get("kdf") != "scrypt":
            raise IntegrityError(f"repository metadata names an unknown key derivation {kek.get('kdf')!r}",
                                 "upgrade pitr")
        try:
            n, r, p = int(kek["n"]), int(kek["r"]), int(kek["p"])
        except (KeyError, TypeError, ValueError):
            raise IntegrityError("repository metadata has malformed scrypt parameters") from None
        # bounds keep a hostile pitr.json from making us allocate without limit (n*r*128 bytes)
        if not (2 <= n <= 1 << 20 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16 and n * r <= 1 << 22):
            raise IntegrityError("repository metadata has scrypt parameters out of range")
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

        return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(source.secret)
    if kek.get("source") == "key-file":
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        return HKDF(hashes.SHA256(), 32, salt, b"pitr key-file kek v1").derive(source.secret)
    raise IntegrityError(f"repository metadata names an unknown key source {kek.get('source')!r}", "upgrade pitr")


def _check(kek: bytes) -> str:
    return hmac.new(kek, _CHECK_MSG, hashlib.sha256).hexdigest()[:32]


def wrap(data_key: bytes, source: KeySource) -> dict[str, Any]:
    """The `encryption` section of pitr.json for data_key under source's key (fresh salt and nonce)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    kek_doc: dict[str, Any] = {"source": source.kind, "salt": _b64(os.urandom(16))}
    if source.kind == "passphrase":
        kek_doc.update(kdf="scrypt", n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    kek = _kek(source, kek_doc)
    nonce = os.urandom(12)
    wrapped = nonce + AESGCM(kek).encrypt(nonce, data_key, _WRAP_AAD)
    return {"cipher": CIPHER_NAME, "kek": kek_doc, "key_check": _check(kek), "wrapped_key": _b64(wrapped)}


def unwrap(section: Any, source: KeySource, display: str) -> bytes:
    """The data key; EncryptionKeyError (exit 2) for a wrong key, IntegrityError for damaged metadata."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if not isinstance(section, dict) or not isinstance(section.get("kek"), dict):
        raise IntegrityError("repository metadata: the encryption section is malformed")
    if section.get("cipher") != CIPHER_NAME:
        raise IntegrityError(f"the repository uses the cipher {section.get('cipher')!r}; this pitr knows "
                             f"{CIPHER_NAME}", "upgrade pitr")
    kek_doc = section["kek"]
    if kek_doc.get("source") != source.kind:
        want = "a key file" if kek_doc.get("source") == "key-file" else "a passphrase"
        raise EncryptionKeyError(f"the repository {display} is encrypted with {want}, but pitr was given the "
                               f"{source.where}", _key_hint(kek_doc.get("source")))
    kek = _kek(source, kek_doc)
    if not hmac.compare_digest(_check(kek), str(section.get("key_check", ""))):
        raise EncryptionKeyError(f"the key from the {source.where} does not open the repository {display}",
                               "give the key the repository was initialized (or last rotated) with")
    blob = _unb64(section.get("wrapped_key", ""), "the wrapped key")
    try:
        key = AESGCM(kek).decrypt(blob[:12], blob[12:], _WRAP_AAD)
    except Exception:  # noqa: BLE001 - InvalidTag, ValueError
        raise IntegrityError(f"the wrapped data key in {display}/pitr.json is damaged (the key check passed)",
                             "restore pitr.json from a copy; without it the repository cannot be read") from None
    if len(key) != 32:
        raise IntegrityError("the wrapped data key in pitr.json has the wrong length")
    return key


def _key_hint(kind: Any) -> str:
    if kind == "key-file":
        return "set encryption_key_file (or PITR_ENCRYPTION_KEY_FILE) to the repository's key file"
    return "set PITR_ENCRYPTION_PASSPHRASE to the repository's passphrase (and no key file)"
