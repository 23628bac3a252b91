"""A region's secrets: token signing keys per kind, and the pseudonym key. Files only.

    <keys dir>/<kind>/<kid>.key   one signing key; the newest kid of a kind signs, every
                                  kid of that kind verifies (rotation without downtime:
                                  add a key, retire the old one once its tokens expired)
    <keys dir>/pseudonym.key      the key of the analysts' pseudonyms

Secrets are files with mode 600 in a folder with mode 700, never environment variables:
in embedded mode the warehouse engine runs inside the process, and a process's
environment is a file (/proc/self/environ) like any other. The keys folder is outside
the warehouse folder and outside anything the engine may read (see owner_api.analyst).
Keys are never printed; `vtp keys list` shows kids only.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from vtp.core.settings import Settings

KINDS = ("owner", "grant", "analyst")
_STAMP = "%Y%m%dT%H%M%S%fZ"
_KID = re.compile(r"^(owner|grant|analyst)-[0-9]{8}T[0-9]{12}Z-[0-9a-f]{8}$")


class KeyFileError(LookupError):
    """A key file is missing, unreadable or malformed."""


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    partial = path.with_suffix(".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    partial.replace(path)


def _new_kid(kind: str, existing: list[str]) -> str:
    """Kids sort by creation time (the newest signs), even two made in one microsecond."""
    stamp = datetime.now(UTC)
    made = [datetime.strptime(k.split("-")[1], _STAMP).replace(tzinfo=UTC) for k in existing]
    if made and stamp <= max(made):
        stamp = max(made) + timedelta(microseconds=1)
    return f"{kind}-{stamp.strftime(_STAMP)}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class KeyRing:
    """Signing keys of one region, per token kind: kind -> {kid: secret}."""

    keys: dict[str, dict[str, str]]

    def signing(self, kind: str) -> tuple[str, str]:
        """(kid, secret) of the newest key of ``kind``."""
        ring = self.keys.get(kind) or {}
        if not ring:
            raise KeyFileError(f"no {kind} signing key")
        kid = max(ring)  # kids sort by creation time
        return kid, ring[kid]

    def lookup(self, kid: object) -> tuple[str, str] | None:
        """(kind, secret) of the key named ``kid``, None when this region has no such key."""
        if not isinstance(kid, str):
            return None
        for kind, ring in self.keys.items():
            if kid in ring:
                return kind, ring[kid]
        return None

    def kids(self) -> dict[str, list[str]]:
        return {kind: sorted(ring) for kind, ring in self.keys.items()}


class KeyFolder:
    """The region's key ring as it is on disk now. A running service reads it again when
    a key is added or retired (the folders' modification times change), so a rotation
    or a retirement takes effect without a restart."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._lock = threading.Lock()
        self._stamp: tuple[int, ...] | None = None
        self._ring = load_keyring(settings)

    def _folders_stamp(self) -> tuple[int, ...]:
        root = self._settings.keys_path
        return tuple(os.stat(root / kind).st_mtime_ns for kind in KINDS)

    def ring(self) -> KeyRing:
        stamp = self._folders_stamp()
        if stamp != self._stamp:
            with self._lock:
                self._ring = load_keyring(self._settings)
                self._stamp = stamp
        return self._ring


def load_keyring(settings: Settings, create: bool = True) -> KeyRing:
    """The region's key ring; with ``create``, a kind without a key gets one (local use)."""
    root = settings.keys_path
    keys: dict[str, dict[str, str]] = {}
    for kind in KINDS:
        folder = root / kind
        ring = {}
        for path in sorted(folder.glob("*.key")) if folder.is_dir() else []:
            if not _KID.match(path.stem) or not path.stem.startswith(kind + "-"):
                raise KeyFileError(f"{path} is not named {kind}-<UTC time to the µs>-<8 hex>.key")
            secret = path.read_text().strip()
            if len(secret) < 32:
                raise KeyFileError(f"{path} holds fewer than 32 characters (HS256 needs more)")
            ring[path.stem] = secret
        if not ring and create:
            kid = add_key(settings, kind)
            ring[kid] = (folder / f"{kid}.key").read_text().strip()
        keys[kind] = ring
    return KeyRing(keys)


def add_key(settings: Settings, kind: str) -> str:
    """A new signing key of ``kind``; it signs from now on. Returns its kid."""
    if kind not in KINDS:
        raise KeyFileError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    folder = settings.keys_path / kind
    existing = [p.stem for p in folder.glob("*.key")] if folder.is_dir() else []
    kid = _new_kid(kind, existing)
    _write_private(folder / f"{kid}.key", secrets.token_urlsafe(48))
    return kid


def retire_key(settings: Settings, kid: str) -> bool:
    """Remove a key: tokens it signed stop verifying. True if it existed."""
    if not _KID.match(kid):
        raise KeyFileError(f"{kid!r} is not a key id")
    path = settings.keys_path / kid.split("-", 1)[0] / f"{kid}.key"
    existed = path.exists()
    path.unlink(missing_ok=True)
    return existed


def pseudonym_key(settings: Settings, create: bool = True) -> bytes:
    path = settings.keys_path / "pseudonym.key"
    if not path.exists():
        if not create:
            raise KeyFileError(f"no pseudonym key at {path}")
        _write_private(path, secrets.token_hex(32))
    return path.read_text().strip().encode()
