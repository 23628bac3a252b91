"""Tokens: what verifies, and why the rest does not (401, never a crash)."""

from __future__ import annotations

import time

import jwt
import pytest

from owner_api.scopes import SCOPES
from owner_api.tokens import (
    Claims,
    TokenError,
    analyst_claims,
    audience,
    issue,
    owner_claims,
    verify,
)
from vtp.core.keys import KeyFileError, add_key, load_keyring, retire_key
from vtp.core.settings import Settings

GRANT = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def eu(tmp_path):
    settings = Settings(data_dir=tmp_path, region="eu")
    return settings, load_keyring(settings)


def signed(ring, payload: dict, kind: str = "owner", kid: str | None = None) -> str:
    """A token with exactly ``payload``, signed with the ring's key of ``kind``."""
    default_kid, secret = ring.signing(kind)
    return jwt.encode(payload, secret, algorithm="HS256", headers={"kid": kid or default_kid})


def base(**claims) -> dict:
    now = int(time.time())
    return {
        "iss": "vtp",
        "aud": audience("eu"),
        "sub": "o",
        "kind": "owner",
        "iat": now,
        "exp": now + 60,
        **claims,
    }


def test_an_owner_token_round_trips_with_every_scope(eu):
    _, ring = eu
    claims = owner_claims("owner-1", "eu", 60)
    back = verify(ring, issue(ring, claims), "eu")
    assert back == claims and back.is_owner and back.scopes == SCOPES and back.actor == "owner"
    assert jwt.get_unverified_header(issue(ring, claims))["kid"].startswith("owner-")


def test_a_grant_token_carries_its_grant_party_and_scopes(eu):
    _, ring = eu
    claims = Claims("owner-1", "eu", int(time.time()) + 60, GRANT, "Insurer", ("driving",), "grant")
    back = verify(ring, issue(ring, claims), "eu")
    assert back == claims and not back.is_owner and back.actor == "party:Insurer"


def test_each_kind_and_each_region_has_keys_of_its_own(eu, tmp_path):
    _settings, ring = eu
    cn_ring = load_keyring(Settings(data_dir=tmp_path, region="cn"))
    owner = issue(ring, owner_claims("o", "eu", 60))
    with pytest.raises(TokenError) as other_region:
        verify(ring, issue(cn_ring, owner_claims("o", "cn", 60)), "eu")
    assert other_region.value.reason == "wrong_region"
    # a CN key's token that claims to be for the EU service: no EU key signed it
    cn_kid, cn_secret = cn_ring.signing("owner")
    claiming_eu = jwt.encode(base(), cn_secret, algorithm="HS256", headers={"kid": cn_kid})
    with pytest.raises(TokenError) as forged:
        verify(ring, claiming_eu, "eu")
    assert forged.value.reason == "forged"
    with pytest.raises(TokenError) as analyst_route:
        verify(ring, owner, "eu", kinds=("analyst",))
    assert analyst_route.value.reason == "wrong_kind"
    analyst = issue(ring, analyst_claims("ana", "eu", 60))
    with pytest.raises(TokenError) as owner_route:
        verify(ring, analyst, "eu")
    assert owner_route.value.reason == "wrong_kind"
    # an owner key cannot make a grant: the kind must match the key that signed it
    forged_grant = signed(ring, base(kind="grant", grant=GRANT, party="p", scopes=["driving"]))
    with pytest.raises(TokenError) as mismatch:
        verify(ring, forged_grant, "eu")
    assert mismatch.value.reason == "malformed"


def test_keys_rotate_without_downtime_and_retired_keys_stop_verifying(eu):
    settings, ring = eu
    old = issue(ring, owner_claims("o", "eu", 60))
    new_kid = add_key(settings, "owner")
    rotated = load_keyring(settings)
    assert rotated.signing("owner")[0] == new_kid
    fresh = issue(rotated, owner_claims("o", "eu", 60))
    assert verify(rotated, old, "eu").owner_id == verify(rotated, fresh, "eu").owner_id == "o"
    old_kid = jwt.get_unverified_header(old)["kid"]
    assert retire_key(settings, old_kid)
    with pytest.raises(TokenError) as caught:
        verify(load_keyring(settings), old, "eu")
    assert caught.value.reason == "forged"


def test_key_files_are_private_and_never_in_the_environment(eu):
    settings, _ = eu
    folder = settings.keys_path / "owner"
    assert folder.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in folder.iterdir())
    (folder / "owner-20260101T000000000000Z-00000000.key").write_text("short")
    with pytest.raises(KeyFileError, match="fewer than 32"):
        load_keyring(settings)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (lambda now: {"exp": now - 120}, "expired"),
        (lambda now: {"exp": 10**30}, "malformed"),  # validly signed, absurd: never a 500
        (lambda now: {"exp": now + 2 * 86400}, "malformed"),  # longer than an owner may hold
        (lambda now: {"exp": float(now + 60)}, "malformed"),
        (lambda now: {"exp": "soon"}, "malformed"),
        (lambda now: {"iat": now + 3600, "exp": now + 3660}, "malformed"),
        (lambda now: {"sub": ["o"]}, "malformed"),
        (lambda now: {"sub": ""}, "malformed"),
        (lambda now: {"sub": {"owner": "o"}}, "malformed"),
        (lambda now: {"aud": "vtp-owner-api:cn"}, "malformed"),
        (lambda now: {"aud": None}, "malformed"),
        (lambda now: {"iss": "someone"}, "malformed"),
        (lambda now: {"kind": "root"}, "malformed"),
        (lambda now: {"admin": True}, "malformed"),  # claims are an allow-list too
        (lambda now: {"iat": None}, "malformed"),
    ],
)  # the claims are made when the test runs, not when it is collected
def test_validly_signed_tokens_with_odd_claims_are_refused_with_a_reason(eu, payload, reason):
    _, ring = eu
    claims = base(**payload(int(time.time())))
    token = signed(ring, {k: v for k, v in claims.items() if v is not None})
    with pytest.raises(TokenError) as caught:
        verify(ring, token, "eu")
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    "grant",
    [
        {"scopes": [["driving"]]},  # a list inside the list
        {"scopes": "driving"},
        {"scopes": []},
        {"scopes": ["driving", "driving"]},
        {"scopes": ["everything"]},
        {"grant": "not-a-grant-id"},
        {"grant": 12},
        {"party": None},
    ],
)
def test_grant_tokens_with_odd_grant_claims_are_refused(eu, grant):
    _, ring = eu
    payload = base(kind="grant", grant=GRANT, party="p", scopes=["driving"]) | grant
    token = signed(ring, {k: v for k, v in payload.items() if v is not None}, kind="grant")
    with pytest.raises(TokenError) as caught:
        verify(ring, token, "eu")
    assert caught.value.reason == "malformed"


@pytest.mark.parametrize(
    "token",
    [
        "not.a.token",
        "a.b.c",
        jwt.encode({"sub": "o"}, "k" * 40, algorithm="HS256"),  # no kid
        jwt.encode(base(), None, algorithm="none"),
        jwt.encode(base(), "x" * 40, algorithm="HS256", headers={"kid": "owner-x"}),
    ],
)
def test_unreadable_or_unsigned_tokens_are_refused(eu, token):
    _, ring = eu
    with pytest.raises(TokenError) as caught:
        verify(ring, token, "eu")
    assert caught.value.reason in ("malformed", "forged")


def test_a_token_signed_with_another_key_of_the_same_name_is_forged(eu):
    _, ring = eu
    kid, _ = ring.signing("owner")
    forged = jwt.encode(base(), "y" * 48, algorithm="HS256", headers={"kid": kid})
    with pytest.raises(TokenError) as caught:
        verify(ring, forged, "eu")
    assert caught.value.reason == "forged"
