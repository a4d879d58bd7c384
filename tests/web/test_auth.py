from __future__ import annotations

import time

import jwt
import pytest

from app.config import Settings
from app.web.auth import LOCAL_USER, Authenticator, ClientAddress, key_user
from app.web.errors import Unauthorized

SECRET = "s3cret-for-tests-only-32-bytes-long"


def auth(**kw) -> Authenticator:
    return Authenticator(Settings(**kw))


def token(**claims) -> str:
    return jwt.encode(claims, SECRET, algorithm="HS256")


def test_without_auth_everyone_is_the_local_user():
    assert auth().user(None) == LOCAL_USER


def test_each_api_key_is_its_own_user():
    a = auth(api_keys=["k1", "k2"])
    assert a.user("Bearer k1") == key_user("k1") != a.user("Bearer k2")
    assert "k1" not in a.user("Bearer k1")  # the key itself is never the user id


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic k1", "Bearer nope", "k1"])
def test_missing_or_wrong_credentials_are_unauthorized(header):
    with pytest.raises(Unauthorized):
        auth(api_keys=["k1"]).user(header)


def test_a_valid_jwt_gives_its_sub():
    a = auth(jwt_secret=SECRET)
    assert a.user("Bearer " + token(sub="alice", exp=int(time.time()) + 60)) == "alice"


@pytest.mark.parametrize("claims", [
    {"sub": "alice", "exp": 1},            # expired
    {"sub": "alice"},                      # no exp
    {"exp": 4102444800},                   # no sub
    {"sub": "", "exp": 4102444800},        # empty sub
])
def test_bad_jwts_are_unauthorized(claims):
    with pytest.raises(Unauthorized):
        auth(jwt_secret=SECRET).user("Bearer " + token(**claims))


def test_a_jwt_signed_with_another_secret_is_unauthorized():
    forged = jwt.encode({"sub": "mallory", "exp": 4102444800}, "another-secret-another-secret-xyz!",
                        algorithm="HS256")
    with pytest.raises(Unauthorized):
        auth(jwt_secret=SECRET).user("Bearer " + forged)


def test_forwarded_for_is_believed_only_from_trusted_proxies():
    addresses = ClientAddress(["10.0.0.0/8"])
    assert addresses.of("203.0.113.9", "1.2.3.4", None) == "203.0.113.9"
    assert addresses.of("10.1.1.1", "1.2.3.4", None) == "1.2.3.4"
    assert addresses.of("10.1.1.1", "6.6.6.6, 1.2.3.4, 10.2.2.2", None) == "1.2.3.4"
    assert addresses.of("10.1.1.1", None, "5.5.5.5") == "5.5.5.5"
    assert ClientAddress([]).of("10.1.1.1", "1.2.3.4", "5.5.5.5") == "10.1.1.1"
