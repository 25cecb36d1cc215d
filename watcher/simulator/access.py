"""OAuth2 tokens as FOSOAuthServerBundle/oauth2-php mint them, and Convertr's rolling rate limits."""

from __future__ import annotations

import base64
import hashlib
import math
import secrets
from collections import deque
from enum import Enum


def mint_token() -> str:
    """URL-safe base64 of a 64-hex SHA-256, unpadded: 86 characters, like oauth2-php's."""
    digest = hashlib.sha256(secrets.token_bytes(100)).hexdigest()
    return base64.urlsafe_b64encode(digest.encode()).decode().rstrip("=")


def public_id() -> str:
    """A FOS client public id, `{id}_{randomId}`."""
    return "4_" + _base36(int.from_bytes(secrets.token_bytes(20), "big"))


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while number:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
    return out or "0"


class TokenState(Enum):
    VALID = "valid"
    UNKNOWN = "unknown"
    EXPIRED = "expired"


class TokenStore:
    """Issued access and refresh tokens with their expiry in virtual Unix seconds."""

    REFRESH_LIFETIME = 1_209_600

    def __init__(self) -> None:
        self.access: dict[str, float] = {}
        self.refresh: dict[str, float] = {}
        self.client_id = public_id()
        self.client_secret = _base36(int.from_bytes(secrets.token_bytes(20), "big"))

    def issue(self, now: float, lifetime: int) -> tuple[str, str]:
        access, refresh = mint_token(), mint_token()
        self.access[access] = now + lifetime
        self.refresh[refresh] = now + self.REFRESH_LIFETIME
        return access, refresh

    def state(self, token: str, now: float) -> TokenState:
        expires = self.access.get(token)
        if expires is None:
            return TokenState.UNKNOWN
        # oauth2-php: a token has expired once time() > expiresAt.
        return TokenState.EXPIRED if now > expires else TokenState.VALID

    def use_refresh(self, token: str, now: float) -> TokenState:
        """Consume a refresh token (they rotate: each works once)."""
        expires = self.refresh.pop(token, None)
        if expires is None:
            return TokenState.UNKNOWN
        return TokenState.EXPIRED if now > expires else TokenState.VALID

    def expire_all(self, now: float) -> None:
        for token in self.access:
            self.access[token] = min(self.access[token], now - 1)


class RollingLimit:
    """At most `limit` admitted events in any `window` seconds."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self.times: deque[float] = deque()

    def admit(self, now: float) -> float | None:
        """Record an event and return None, or refuse it and return whole seconds until room frees."""
        while self.times and self.times[0] <= now - self.window:
            self.times.popleft()
        if len(self.times) >= self.limit:
            return float(max(1, math.ceil(self.times[0] + self.window - now)))
        self.times.append(now)
        return None
