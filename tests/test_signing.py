"""Signing is checked only against the independent `standardwebhooks` reference library."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from watcher import __version__
from watcher.signing import decode_secret, sign, webhook_headers

KEY_A = bytes(range(1, 33))
KEY_B = bytes(range(100, 124))
SECRET_A = "whsec_" + base64.b64encode(KEY_A).decode()
SECRET_B = "whsec_" + base64.b64encode(KEY_B).decode()
BODY = '{"type":"lead.created","timestamp":"2024-05-01T10:00:00.000Z","data":{"lead":{"id":7,"name":"Zoë"}}}'.encode()
MSG_ID = "evt_0123456789abcdefghijklmnop"
TS = 1_714_557_600


def reference_signature(secret: str, msg_id: str, ts: int, body: bytes) -> str:
    return str(Webhook(secret).sign(msg_id, datetime.fromtimestamp(ts, tz=UTC), body.decode()))


@pytest.mark.parametrize(
    ("whsec", "key"),
    [
        (SECRET_A, KEY_A),
        (SECRET_A.rstrip("="), KEY_A),
        ("  " + SECRET_B + "\n", KEY_B),
        ("whsec_" + base64.b64encode(b"k").decode().rstrip("="), b"k"),
    ],
)
def test_decode_secret_matches_the_reference_key(whsec: str, key: bytes) -> None:
    """Padded, unpadded and whitespace-wrapped secrets decode to the key the reference library uses."""
    assert decode_secret(whsec) == key
    assert reference_signature(whsec.strip(), MSG_ID, TS, BODY) == sign(MSG_ID, TS, BODY, [key])


@pytest.mark.parametrize("whsec", ["", "whsec_", "abc", "whsec_!!notbase64!!", "WHSEC_" + SECRET_A[6:]])
def test_decode_secret_rejects_malformed_values_without_echoing_them(whsec: str) -> None:
    """A bad secret is a ValueError whose message does not contain the secret itself."""
    with pytest.raises(ValueError) as info:
        decode_secret(whsec)
    if len(whsec) > 6:
        assert whsec[6:] not in str(info.value)


def test_single_key_signature_is_what_the_reference_library_computes() -> None:
    """One key gives exactly one `v1,` entry, equal to the library's own signature."""
    assert sign(MSG_ID, TS, BODY, [KEY_A]) == reference_signature(SECRET_A, MSG_ID, TS, BODY)


def test_two_keys_give_two_space_separated_entries_each_verifiable() -> None:
    """During rotation the header carries one entry per key, in key order."""
    header = sign(MSG_ID, TS, BODY, [KEY_A, KEY_B])
    assert header.split(" ") == [
        reference_signature(SECRET_A, MSG_ID, TS, BODY),
        reference_signature(SECRET_B, MSG_ID, TS, BODY),
    ]


def test_id_with_a_dot_is_refused() -> None:
    """The signed content is dot-delimited, so an id containing '.' cannot be signed."""
    with pytest.raises(ValueError):
        sign("evt_a.b", TS, BODY, [KEY_A])


def test_headers_verify_with_standardwebhooks_and_name_the_version() -> None:
    """The full header set passes `Webhook.verify` for a current timestamp and carries the contract names."""
    now = int(datetime.now(tz=UTC).timestamp())
    headers = webhook_headers(MSG_ID, now, BODY, [KEY_A], __version__)
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == f"convertr-watcher/{__version__}"
    assert headers["webhook-id"] == MSG_ID
    assert headers["webhook-timestamp"] == str(now)
    assert Webhook(SECRET_A).verify(BODY, headers) == {
        "type": "lead.created",
        "timestamp": "2024-05-01T10:00:00.000Z",
        "data": {"lead": {"id": 7, "name": "Zoë"}},
    }


@pytest.mark.parametrize("secret", [SECRET_A, SECRET_B])
def test_rotation_a_receiver_holding_either_key_verifies(secret: str) -> None:
    """Signed with both keys, a receiver that knows only one of them still accepts the request."""
    now = int(datetime.now(tz=UTC).timestamp())
    headers = webhook_headers(MSG_ID, now, BODY, [KEY_A, KEY_B], "0")
    Webhook(secret).verify(BODY, headers)


def test_a_receiver_with_another_key_or_altered_body_rejects() -> None:
    """A different key, or a body changed by one byte, fails verification."""
    now = int(datetime.now(tz=UTC).timestamp())
    headers = webhook_headers(MSG_ID, now, BODY, [KEY_A], "0")
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_B).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_A).verify(BODY.replace(b"7", b"8"), headers)


def test_no_keys_means_no_signature_header() -> None:
    """A sink without secrets sends id and timestamp but no signature."""
    headers = webhook_headers(MSG_ID, TS, BODY, [], "0")
    assert "webhook-signature" not in headers
    assert headers["webhook-timestamp"] == str(TS)
