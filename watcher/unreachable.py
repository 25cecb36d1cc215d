"""Why a peer could not be reached, in words an operator can act on.

The HTTP libraries wrap the operating system's error (a refused connection, a name that does not
resolve, a certificate OpenSSL rejected) in errors of their own whose texts name the host, and a
sink URL can be a secret. `describe` digs out the root cause and names it from its type, errno
or OpenSSL verify code alone, never from a message.
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Iterator

DOES_NOT_RESOLVE = "host name does not resolve"
REFUSED = "connection refused"
TIMED_OUT = "timed out"

# OpenSSL's X509_V_ERR_* codes (x509_vfy.h) for the certificate failures worth telling apart.
_VERIFY_TEXT = {
    9: "TLS: certificate not yet valid",
    10: "TLS: certificate expired",
    2: "TLS: unknown CA (the certificate's issuer is not trusted)",
    18: "TLS: unknown CA (a self-signed certificate)",
    19: "TLS: unknown CA (a self-signed certificate in the chain)",
    20: "TLS: unknown CA (the certificate's issuer is not trusted)",
    21: "TLS: unknown CA (the certificate's issuer is not trusted)",
    23: "TLS: certificate revoked",
    62: "TLS: hostname mismatch (the certificate is for another name)",
    64: "TLS: hostname mismatch (the certificate is for another name)",  # the URL names an IP address
}
_ERRNO_TEXT = {
    errno.ECONNREFUSED: REFUSED,
    errno.ECONNRESET: "connection reset by the peer",
    errno.EPIPE: "connection reset by the peer",
    errno.ECONNABORTED: "connection reset by the peer",
    errno.ENETUNREACH: "network unreachable",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ETIMEDOUT: TIMED_OUT,
}


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and everything under it: causes, contexts, grouped errors, and the OS error an aiohttp
    connector error carries as an attribute."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for name in ("certificate_error", "os_error"):
            inner = getattr(current, name, None)
            if isinstance(inner, BaseException):
                todo.append(inner)
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        for inner in (current.__cause__, current.__context__):
            if inner is not None:
                todo.append(inner)


def describe(exc: BaseException, fallback: str) -> str:
    """The most telling cause under `exc`, or `fallback` when none is recognised."""
    found = list(causes(exc))
    for cause in found:
        # aiohttp's wrapper is an SSLCertVerificationError too, without OpenSSL's code: the one under it has it.
        code = getattr(cause, "verify_code", None)
        if isinstance(cause, ssl.SSLCertVerificationError) and isinstance(code, int):
            return _VERIFY_TEXT.get(code, f"TLS: certificate not accepted (OpenSSL verify code {code})")
    for cause in found:
        if isinstance(cause, socket.gaierror):
            return DOES_NOT_RESOLVE
        if isinstance(cause, ssl.SSLError):
            # The reason is OpenSSL's token (WRONG_VERSION_NUMBER, TLSV1_ALERT_…): it holds no host.
            reason = getattr(cause, "reason", None)
            return f"TLS handshake failed ({reason})" if reason else "TLS handshake failed"
        if isinstance(cause, UnicodeError):
            return "host name is not valid"
    for cause in found:
        if isinstance(cause, OSError) and cause.errno in _ERRNO_TEXT:
            return _ERRNO_TEXT[cause.errno]
        if isinstance(cause, TimeoutError):
            return TIMED_OUT
    return fallback
