"""Owner and grant tokens: what verifies, and why the rest does not."""

from __future__ import annotations

import time

import jwt
import pytest

from owner_api.tokens import SCOPES, Claims, TokenError, issue, owner_claims, signing_key, verify
from vtp.settings import Settings, SettingsError, load_settings

KEY = "k" * 40


def test_an_owner_token_round_trips_with_every_scope():
    claims = owner_claims("owner-1", "eu", 60)
    back = verify(KEY, issue(KEY, claims))
    assert back == claims and back.is_owner and back.scopes == SCOPES and back.actor == "owner"


def test_a_grant_token_carries_its_grant_party_and_scopes():
    claims = Claims("owner-1", "cn", int(time.time()) + 60, "g" * 32, "Insurer", ("driving",))
    back = verify(KEY, issue(KEY, claims))
    assert back == claims and not back.is_owner and back.actor == "party:Insurer"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (lambda: issue("x" * 40, owner_claims("o", "eu", 60)), "forged"),
        (lambda: issue(KEY, Claims("o", "eu", int(time.time()) - 1)), "expired"),
        (lambda: "not.a.token", "malformed"),
        (lambda: jwt.encode({"sub": "o", "exp": time.time() + 60}, KEY, algorithm="HS256"), "malformed"),  # no issuer
        (lambda: jwt.encode({"iss": "vtp", "sub": "o", "exp": time.time() + 60, "region": "eu"}, KEY, algorithm="HS512"), "malformed"),
        (lambda: jwt.encode({"iss": "vtp", "sub": "o", "exp": time.time() + 60, "region": "eu"}, None, algorithm="none"), "malformed"),
        (lambda: jwt.encode({"iss": "vtp", "sub": "o", "exp": time.time() + 60, "region": "eu",
                             "grant": "g", "scopes": ["everything"]}, KEY, algorithm="HS256"), "malformed"),
    ],
)  # fmt: skip
def test_tokens_that_do_not_verify_say_why(token, reason):
    with pytest.raises(TokenError) as caught:
        verify(KEY, token())
    assert caught.value.reason == reason


def test_without_a_configured_key_one_is_made_once_and_kept_private(tmp_path):
    settings = Settings(data_dir=tmp_path)
    key = signing_key(settings)
    path = tmp_path / "owner_api" / "signing.key"
    assert len(key) >= 32 and path.stat().st_mode & 0o777 == 0o600
    assert signing_key(settings) == key
    assert signing_key(settings.with_(api_signing_key="c" * 32)) == "c" * 32


def test_a_short_configured_key_is_refused():
    with pytest.raises(SettingsError, match="at least 32 characters"):
        load_settings({"VTP_API_SIGNING_KEY": "short"})
