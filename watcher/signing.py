"""Standard Webhooks signing: `whsec_` keys, `v1,<b64>` signatures and the request headers.

The signed content is `{id}.{timestamp}.{body}` over the exact body bytes that go on the wire,
so the body is never re-serialised after signing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence

SECRET_PREFIX = "whsec_"


# What `new-secret` draws: the middle of what a sink accepts (24 to 64 bytes), HMAC-SHA256's block half.
NEW_SECRET_BYTES = 32


def new_secret() -> str:
    """A fresh `whsec_<base64>` key from the operating system's random source."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(NEW_SECRET_BYTES)).decode()


def decode_secret(whsec: str) -> bytes:
    """The raw HMAC key of a `whsec_<base64>` secret; ValueError (without the secret) when malformed."""
    text = whsec.strip()
    if not text.startswith(SECRET_PREFIX):
        raise ValueError("webhook secret must start with 'whsec_'")
    encoded = text[len(SECRET_PREFIX) :]
    # Some generators drop the base64 padding; the reference libraries accept that too.
    encoded += "=" * (-len(encoded) % 4)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("webhook secret is not valid base64 after 'whsec_'") from None
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def sign(msg_id: str, timestamp: int, body: bytes, keys: Sequence[bytes]) -> str:
    """`v1,<b64>` per key, space-separated: every configured key signs, so rotation needs no flag day."""
    # The signed content is dot-delimited; a dot inside the id would make it ambiguous.
    if "." in msg_id:
        raise ValueError("message id must not contain '.'")
    content = f"{msg_id}.{timestamp}.".encode() + body
    entries = []
    for key in keys:
        digest = hmac.new(key, content, hashlib.sha256).digest()
        entries.append("v1," + base64.b64encode(digest).decode("ascii"))
    return " ".join(entries)


def webhook_headers(msg_id: str, timestamp: int, body: bytes, keys: Sequence[bytes], version: str) -> dict[str, str]:
    """The headers of one attempt; `webhook-signature` is left out only when no key is configured."""
    headers = {
        "content-type": "application/json",
        "user-agent": f"convertr-watcher/{version}",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
    }
    if keys:
        headers["webhook-signature"] = sign(msg_id, timestamp, body, keys)
    return headers
