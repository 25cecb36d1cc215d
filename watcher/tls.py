"""The TLS context every HTTP client of the process shares.

httpx loads the CA bundle into a fresh context for each client it builds, about 45 ms apiece;
the Convertr client and every sink would each pay it at start-up (and again at every reload).
One context, built on first use with httpx's own defaults, serves them all.
"""

from __future__ import annotations

import ssl
from functools import cache

import httpx


@cache
def client_context() -> ssl.SSLContext:
    """httpx's default verifying context (certifi's bundle, or SSL_CERT_FILE / SSL_CERT_DIR), built once."""
    return httpx.create_ssl_context()
