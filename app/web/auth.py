"""Who is asking: API keys, HS256 JWTs, and the client address behind trusted proxies.

Each key in AGENTD_API_KEYS is its own user (named by a hash of the key, so logs and the
database never hold the key itself); a JWT's user is its `sub`. With no auth configured,
everyone is the single user ``local``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import TYPE_CHECKING, Any

import jwt

from app.web.errors import Unauthorized

if TYPE_CHECKING:
    from collections.abc import Iterable

    from app.config import Settings

LOCAL_USER = "local"


def key_user(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.auth_enabled
        self._keys = [(key.encode(), key_user(key)) for key in settings.api_keys]
        self._secret = settings.jwt_secret

    def user(self, authorization: str | None) -> str:
        """The user for an Authorization header, or `Unauthorized`."""
        if not self.enabled:
            return LOCAL_USER
        if not authorization:
            raise Unauthorized("missing Authorization: Bearer <API key or JWT>")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("expected Authorization: Bearer <API key or JWT>")
        for key, user in self._keys:
            if hmac.compare_digest(key, token.encode()):
                return user
        if self._secret is not None and token.count(".") == 2:
            return self._jwt_user(token)
        raise Unauthorized("invalid API key or token")

    def _jwt_user(self, token: str) -> str:
        assert self._secret is not None
        try:
            claims: dict[str, Any] = jwt.decode(
                token, self._secret, algorithms=["HS256"],
                options={"require": ["exp", "sub"]})
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the token has expired") from None
        except jwt.InvalidTokenError as e:
            raise Unauthorized(f"invalid token: {e}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise Unauthorized("invalid token: sub must be a non-empty string")
        return sub


class ClientAddress:
    """The client's address: the peer, or what a trusted proxy says it forwarded for."""

    def __init__(self, trusted: Iterable[str]) -> None:
        self._trusted = [ipaddress.ip_network(t, strict=False) for t in trusted]

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return False
        return any(ip in net for net in self._trusted)

    def of(self, peer: str | None, forwarded_for: str | None, real_ip: str | None) -> str:
        peer = peer or "unknown"
        if not self._trusted or not self._is_trusted(peer):
            return peer
        if forwarded_for:
            # Walk from the nearest hop back: the first address we don't trust is the client.
            hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
            for hop in reversed(hops):
                if not self._is_trusted(hop):
                    return hop
            if hops:
                return hops[0]
        if real_ip and real_ip.strip():
            return real_ip.strip()
        return peer
