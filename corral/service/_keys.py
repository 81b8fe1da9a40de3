"""Credentials at rest: a key ring of Fernet keys (CORRAL_ENCRYPTION_KEYS, comma-separated;
the first encrypts, all decrypt), or, without one, a key generated once into the state dir
(mode 0600). Connections' credentials are stored only as Fernet tokens; `rotate_keys`
re-encrypts them all with the first key."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from corral._exceptions import ConfigError

if TYPE_CHECKING:
    from corral.config import Settings
    from corral.service.records import Records

logger = logging.getLogger("corral.keys")

KEY_FILE = "encryption.key"
CANARY_KEY = "key_canary"
CANARY_TEXT = "corral key canary"


class KeyRingError(Exception):
    """Stored credentials cannot be decrypted with the configured keys."""


def key_id(key: bytes) -> str:
    """A short, stable name of a key that reveals nothing of it."""
    return hashlib.sha256(key).hexdigest()[:12]


class KeyRing:
    """Fernet keys: the first encrypts, every one decrypts."""

    def __init__(self, keys: list[bytes], *, source: str) -> None:
        if not keys:
            raise ConfigError("a key ring needs at least one key")
        self.keys = keys
        self.source = source  # where the keys came from, for messages
        self.primary_id = key_id(keys[0])
        self._ring = MultiFernet([Fernet(key) for key in keys])
        self._primary = Fernet(keys[0])

    def __repr__(self) -> str:  # never the keys themselves
        return f"KeyRing({len(self.keys)} key(s) from {self.source}, primary {self.primary_id})"

    def encrypt(self, value: Any) -> str:
        """A token holding `value` (JSON), encrypted with the first key."""
        return self._primary.encrypt(json.dumps(value).encode()).decode()

    def decrypt(self, token: str) -> Any:
        """The value in `token`; KeyRingError when no key of the ring opens it."""
        try:
            return json.loads(self._ring.decrypt(token.encode()))
        except InvalidToken:
            raise KeyRingError(
                f"no key of {self.source} decrypts the stored credentials: keep the key they "
                "were encrypted with in CORRAL_ENCRYPTION_KEYS (after the new first key) until "
                "`corral rotate-keys` has re-encrypted them, and give every process the same keys"
            ) from None

    def is_primary(self, token: str) -> bool:
        """Whether `token` was encrypted with the first key (rotation leaves it alone)."""
        try:
            self._primary.decrypt(token.encode())
        except InvalidToken:
            return False
        return True

    def rotate(self, token: str) -> str:
        """`token` re-encrypted with the first key."""
        try:
            return self._ring.rotate(token.encode()).decode()
        except InvalidToken:
            self.decrypt(token)  # raises the explanatory KeyRingError
            raise


def _parse_keys(text: str) -> list[bytes]:
    keys = []
    for index, part in enumerate(p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            Fernet(part.encode())
        except (ValueError, TypeError):
            raise ConfigError(
                f"corral: CORRAL_ENCRYPTION_KEYS is invalid: key {index + 1} is not a Fernet "
                "key (32 url-safe base64-encoded bytes; make one with `python -c 'from "
                "cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'`)"
            ) from None
        keys.append(part.encode())
    if not keys:
        raise ConfigError("corral: CORRAL_ENCRYPTION_KEYS is set but holds no key")
    return keys


def load_key_ring(settings: Settings) -> KeyRing:
    """The deployment's key ring: CORRAL_ENCRYPTION_KEYS, else the state dir's key file,
    generated (and said so, once) when there is none."""
    if settings.encryption_keys is not None:
        keys = _parse_keys(settings.encryption_keys.get_secret_value())
        return KeyRing(keys, source="CORRAL_ENCRYPTION_KEYS")
    path = Path(settings.state_dir) / KEY_FILE
    where = f"corral: the key file {str(path)!r} is unusable"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(Fernet.generate_key())
            logger.warning(
                "corral: generated an encryption key for stored credentials into %s (mode "
                "0600); back it up, and give every process the same key with "
                "CORRAL_ENCRYPTION_KEYS when they do not share this state dir",
                path,
            )
        key = _read_key_file(path)
    except OSError as exc:
        raise ConfigError(
            f"{where}: {exc.strerror or exc}; or set CORRAL_ENCRYPTION_KEYS"
        ) from None
    return KeyRing(_parse_key_file(key, where), source=str(path))


def _read_key_file(path: Path) -> bytes:
    """The key, waiting briefly for another process that is writing it right now."""
    deadline = time.monotonic() + 2
    while True:
        key = path.read_bytes().strip()
        if key or time.monotonic() > deadline:
            return key
        time.sleep(0.01)


def _parse_key_file(key: bytes, where: str) -> list[bytes]:
    try:
        Fernet(key)
    except (ValueError, TypeError):
        raise ConfigError(f"{where}: it holds no Fernet key; restore it from a backup") from None
    return [key]


async def ensure_canary(records: Records, ring: KeyRing) -> None:
    """Store the canary the readiness check decrypts, the first time."""
    await records.put_meta(CANARY_KEY, ring.encrypt(CANARY_TEXT), only_new=True)


async def check_canary(records: Records, ring: KeyRing) -> None:
    """Raise KeyRingError when the key ring cannot open the stored canary."""
    token = await records.get_meta(CANARY_KEY)
    if token is None:
        await ensure_canary(records, ring)
        return
    if ring.decrypt(token) != CANARY_TEXT:
        raise KeyRingError("the key canary holds an unexpected value")


@dataclass(frozen=True)
class Rotation:
    """What `rotate_keys` did: stored secrets re-encrypted, already current, changed by
    someone else meanwhile (left to them)."""

    rotated: int
    current: int
    raced: int


async def rotate_keys(
    records: Records,
    ring: KeyRing,
    *,
    progress: Callable[[int, int, str], None] = lambda done, total, app: None,
) -> Rotation:
    """Re-encrypt every stored credential (and the canary) with the first key.

    One connection at a time, each written only over the secret it read, so it is safe
    to interrupt and to repeat, and never overwrites a connection stored meanwhile.
    """
    connections = await records.list_connections()
    rotated = current = raced = 0
    for done, connection in enumerate(connections, 1):
        secret = connection["secret"]
        if ring.is_primary(secret):
            current += 1
        else:
            renewed = {**connection, "secret": ring.rotate(secret), "key_id": ring.primary_id}
            if await records.put_connection(renewed, expect_secret=secret):
                rotated += 1
            else:
                raced += 1
        progress(done, len(connections), connection["app"])
    canary = await records.get_meta(CANARY_KEY)
    if canary is not None and not ring.is_primary(canary):
        await records.put_meta(CANARY_KEY, ring.rotate(canary))
    return Rotation(rotated, current, raced)
