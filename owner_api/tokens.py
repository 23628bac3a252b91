"""Bearer tokens: signed (HS256), with an expiry, for an owner or for a grant.

An owner token carries the owner id and the region it was issued for. A grant token
carries the grant id as well: the service looks the grant up on every request, so a
revoked grant stops working at once, whatever the token's own expiry says.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

from vtp.settings import Settings

ISSUER = "vtp"
# What a grant can open. Each signal and each location column belongs to one scope.
SCOPES = ("location", "driving", "battery", "diagnostics", "climate")
SIGNAL_SCOPE = {
    "latitude": "location",
    "longitude": "location",
    "heading": "location",
    "speed": "driving",
    "odometer": "driving",
    "gear": "driving",
    "soc": "battery",
    "is_charging": "battery",
    "charge_power": "battery",
    "charge_mode": "battery",
    "battery_temperature": "battery",
    "dtcs": "diagnostics",
    "outside_temperature": "climate",
    "cabin_temperature": "climate",
}


class TokenError(ValueError):
    """The token cannot be used; ``reason`` is one of malformed, forged, expired, wrong_kind."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Claims:
    owner_id: str
    region: str
    expires_at: int  # unix seconds
    grant_id: str | None = None  # None: the owner's own token
    party: str | None = None
    scopes: tuple[str, ...] = SCOPES

    @property
    def is_owner(self) -> bool:
        return self.grant_id is None

    @property
    def actor(self) -> str:
        return "owner" if self.is_owner else f"party:{self.party}"


def signing_key(settings: Settings) -> str:
    """VTP_API_SIGNING_KEY, else a random key kept in the data folder (local use)."""
    if settings.api_signing_key:
        return settings.api_signing_key
    path = settings.data_dir / "owner_api" / "signing.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_private(path, secrets.token_urlsafe(48))
    return path.read_text().strip()


def _write_private(path: Path, text: str) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    partial.chmod(0o600)
    partial.replace(path)


def issue(key: str, claims: Claims) -> str:
    payload = {
        "iss": ISSUER,
        "sub": claims.owner_id,
        "region": claims.region,
        "exp": claims.expires_at,
        "iat": int(time.time()),
    }
    if claims.grant_id is not None:
        payload |= {"grant": claims.grant_id, "party": claims.party, "scopes": list(claims.scopes)}
    return jwt.encode(payload, key, algorithm="HS256")


def owner_claims(owner_id: str, region: str, ttl_s: int, now: float | None = None) -> Claims:
    return Claims(owner_id, region, int((now or time.time()) + ttl_s))


def _decode(key: str, token: str) -> dict:
    try:
        return jwt.decode(
            token,
            key,
            algorithms=["HS256"],  # never "none", never what the token header asks for
            issuer=ISSUER,
            options={"require": ["exp", "sub", "iss"]},
        )
    except jwt.ExpiredSignatureError:
        raise TokenError("expired", "the token has expired; ask for a new one") from None
    except jwt.InvalidSignatureError:
        raise TokenError("forged", "the token's signature does not verify") from None
    except jwt.PyJWTError as exc:
        raise TokenError("malformed", f"the token cannot be read: {exc}") from None


def verify(key: str, token: str) -> Claims:
    """The claims of an owner or grant token this service signed, not expired."""
    payload = _decode(key, token)
    region = payload.get("region")
    if payload.get("role") == "analyst":
        raise TokenError("wrong_kind", "an analyst token opens only /v1/analyst/sql")
    if not isinstance(payload["sub"], str) or not isinstance(region, str):
        raise TokenError("malformed", "the token names no owner or region")
    grant = payload.get("grant")
    if grant is None:
        return Claims(payload["sub"], region, int(payload["exp"]))
    scopes = payload.get("scopes")
    if not isinstance(scopes, list) or not set(scopes) <= set(SCOPES):
        raise TokenError("malformed", "the grant token carries unknown scopes")
    return Claims(
        payload["sub"], region, int(payload["exp"]), str(grant), str(payload.get("party")),
        tuple(scopes),
    )  # fmt: skip


def issue_analyst(key: str, name: str, region: str, ttl_s: int) -> str:
    """A token for the pseudonymised analyst views of one region, nothing else."""
    payload = {"iss": ISSUER, "sub": name, "role": "analyst", "region": region,
               "exp": int(time.time() + ttl_s)}  # fmt: skip
    return jwt.encode(payload, key, algorithm="HS256")


def verify_analyst(key: str, token: str) -> tuple[str, str]:
    """(analyst name, region) of a valid analyst token."""
    payload = _decode(key, token)
    if payload.get("role") != "analyst":
        raise TokenError("wrong_kind", "this route needs an analyst token")
    return str(payload["sub"]), str(payload.get("region"))
