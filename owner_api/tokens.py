"""Bearer tokens: HS256 JWTs of three kinds (owner, grant, analyst), one region each.

Each kind has its own keys in each region (vtp.core.keys); the token's header names its key
(``kid``), so keys rotate without downtime, and a key of one kind or region never
verifies a token of another. The audience names the region's service. Every claim is
checked against an allow-list of names and types, and lifetimes are capped when a
token is verified, not only when it is issued: a validly signed token with an odd
claim is refused (401 malformed_token), never a 500.

A grant token carries the grant id: the service looks the grant up on every request,
so a revoked grant stops working at once, whatever the token's own expiry says.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import jwt

from owner_api.scopes import SCOPES
from vtp.core.keys import KeyRing

ISSUER = "vtp"
GRANT_MAX_TTL_S = 366 * 86400
ANALYST_MAX_TTL_S = 86400
CLOCK_LEEWAY_S = 60
_BASE_CLAIMS = {"iss", "aud", "sub", "iat", "exp", "kind"}
_GRANT_CLAIMS = _BASE_CLAIMS | {"grant", "party", "scopes"}
_GRANT_ID = re.compile(r"^[0-9a-f]{32}$")


class TokenError(ValueError):
    """The token cannot be used; ``reason`` is one of malformed, forged, expired,
    wrong_kind, wrong_region."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Claims:
    owner_id: str  # for an analyst token: the analyst's name
    region: str
    expires_at: int  # unix seconds
    grant_id: str | None = None  # None: the owner's own token
    party: str | None = None
    scopes: tuple[str, ...] = SCOPES
    kind: str = "owner"

    @property
    def is_owner(self) -> bool:
        return self.kind == "owner"

    @property
    def actor(self) -> str:
        return "owner" if self.is_owner else f"party:{self.party}"


def audience(region: str) -> str:
    return f"vtp-owner-api:{region}"


def issue(ring: KeyRing, claims: Claims, now: float | None = None) -> str:
    issued = int(now if now is not None else time.time())
    payload = {
        "iss": ISSUER,
        "aud": audience(claims.region),
        "sub": claims.owner_id,
        "kind": claims.kind,
        "iat": issued,
        "exp": claims.expires_at,
    }
    if claims.kind == "grant":
        payload |= {"grant": claims.grant_id, "party": claims.party, "scopes": list(claims.scopes)}
    kid, secret = ring.signing(claims.kind)
    return jwt.encode(payload, secret, algorithm="HS256", headers={"kid": kid})


def owner_claims(owner_id: str, region: str, ttl_s: int, now: float | None = None) -> Claims:
    return Claims(owner_id, region, int((now if now is not None else time.time()) + ttl_s))


def analyst_claims(name: str, region: str, ttl_s: int) -> Claims:
    return Claims(name, region, int(time.time() + ttl_s), scopes=(), kind="analyst")


def _unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        return jwt.get_unverified_header(token), jwt.decode(
            token, options={"verify_signature": False}
        )
    except jwt.PyJWTError as exc:
        raise TokenError("malformed", f"the token cannot be read: {exc}") from None


def verify(
    ring: KeyRing,
    token: str,
    region: str,
    kinds: tuple[str, ...] = ("owner", "grant"),
    max_owner_ttl_s: int = 86400,
    now: float | None = None,
) -> Claims:
    """The claims of a token this region's service signed, of one of ``kinds``."""
    header, unverified = _unverified(token)
    found = ring.lookup(header.get("kid"))
    if found is None:
        aud = unverified.get("aud") if isinstance(unverified, dict) else None
        if isinstance(aud, str) and aud.startswith("vtp-owner-api:") and aud != audience(region):
            raise TokenError(
                "wrong_region",
                f"the token is for {aud.split(':', 1)[1]!r}; this service serves {region!r}",
            )
        raise TokenError("forged", "the token was not signed by a key of this service")
    kind, secret = found
    try:
        payload = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],  # never "none", never what the token header asks for
            audience=audience(region),
            issuer=ISSUER,
            leeway=CLOCK_LEEWAY_S,
            options={"require": ["exp", "iat", "sub", "iss", "aud", "kind"]},
        )
    except jwt.ExpiredSignatureError:
        raise TokenError("expired", "the token has expired; ask for a new one") from None
    except jwt.InvalidSignatureError:
        raise TokenError("forged", "the token's signature does not verify") from None
    except jwt.PyJWTError as exc:
        raise TokenError("malformed", f"the token cannot be used: {exc}") from None
    claims = _checked_claims(payload, kind, region, max_owner_ttl_s, now)
    if claims.kind not in kinds:
        raise TokenError(
            "wrong_kind", f"a {claims.kind} token does not open this; it needs {' or '.join(kinds)}"
        )
    return claims


def _text(payload: dict[str, Any], name: str, longest: int = 200) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= longest:
        raise TokenError("malformed", f"claim {name!r} must be text of 1 to {longest} characters")
    return value


def _whole(payload: dict[str, Any], name: str) -> int:
    value = payload.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TokenError("malformed", f"claim {name!r} must be a whole number of seconds")
    return value


def _checked_claims(
    payload: dict[str, Any], kind: str, region: str, max_owner_ttl_s: int, now: float | None
) -> Claims:
    allowed = _GRANT_CLAIMS if kind == "grant" else _BASE_CLAIMS
    extra = sorted(set(payload) - allowed)
    if extra:
        raise TokenError("malformed", f"unexpected claims {extra}")
    if payload.get("kind") != kind:
        raise TokenError("malformed", "the token's kind does not match its key")
    if payload.get("aud") != audience(region):  # one audience, not a list that holds it
        raise TokenError("malformed", f"the token's audience must be {audience(region)!r}")
    subject = _text(payload, "sub")
    issued, expires = _whole(payload, "iat"), _whole(payload, "exp")
    longest = {"owner": max_owner_ttl_s, "grant": GRANT_MAX_TTL_S}.get(kind, ANALYST_MAX_TTL_S)
    if expires - issued > longest:
        raise TokenError(
            "malformed", f"a {kind} token lives at most {longest} s; this one {expires - issued} s"
        )
    if issued > (now if now is not None else time.time()) + CLOCK_LEEWAY_S:
        raise TokenError("malformed", "the token was issued in the future")
    if kind != "grant":
        return Claims(subject, region, expires, scopes=SCOPES if kind == "owner" else (), kind=kind)
    grant, party = _text(payload, "grant", 32), _text(payload, "party")
    if not _GRANT_ID.match(grant):
        raise TokenError("malformed", "claim 'grant' is not a grant id")
    scopes = payload.get("scopes")
    if (
        not isinstance(scopes, list)
        or not scopes
        or not all(isinstance(s, str) and s in SCOPES for s in scopes)
        or len(set(scopes)) != len(scopes)
    ):
        raise TokenError("malformed", f"claim 'scopes' must list distinct scopes of {SCOPES}")
    return Claims(subject, region, expires, grant, party, tuple(scopes), kind="grant")
