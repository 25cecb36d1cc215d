"""Reading HTTP answer bodies with a ceiling on what they may become once decoded.

httpx inflates a gzip body whole before anyone can count it, so a 300 KB answer that inflates to
300 MB costs 300 MB. Here the raw bytes are read as they arrive and inflated in bounded steps,
so no more than the ceiling (plus one step) is ever held, however the body is encoded.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import httpx

# Content-Encoding values read here: what the watcher asks for (gzip and deflate from Convertr,
# identity from receivers), plus identity's aliases.
_GZIP = frozenset({"gzip", "x-gzip"})
_IDENTITY = frozenset({"", "identity"})
_ENTITY_HEADERS = ("content-encoding", "content-length", "transfer-encoding")
# Inflate at most this much at a time: one 64 KB network read of a bomb could otherwise become
# 64 MB in one piece, on top of what was already held.
STEP = 256 * 1024


class BodyError(ValueError):
    """The body could not be read within the rules: too large, or in an encoding not decoded here."""


class BodyTooLarge(BodyError):
    """The body, decoded, is larger than the ceiling."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"larger than {limit} bytes once decoded")


class UnreadableEncoding(BodyError):
    """A Content-Encoding that is not decoded here, or a compressed body that is corrupt."""


@dataclass(frozen=True)
class Answer:
    """One HTTP answer: status, headers, and the decoded body (all of it, or the excerpt read)."""

    status_code: int
    headers: httpx.Headers
    content: bytes

    @property
    def reason_phrase(self) -> str:
        return httpx.codes.get_reason_phrase(self.status_code)

    @property
    def text(self) -> str:
        # UTF-8 whatever the charset says: these texts only ever feed excerpts and error tokens.
        return self.content.decode("utf-8", "replace")


class _Inflater:
    """One Content-Encoding's decoder, producing at most `room` bytes per call."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._zlib: zlib._Decompress | None = None
        if encoding in _GZIP:
            self._zlib = zlib.decompressobj(zlib.MAX_WBITS | 16)
        elif encoding == "deflate":
            self._zlib = zlib.decompressobj(zlib.MAX_WBITS)
        elif encoding not in _IDENTITY:
            raise UnreadableEncoding(f"Content-Encoding {encoding[:40]!r} is not supported")
        self._first = True
        self._pending = b""

    def feed(self, data: bytes, room: int) -> bytes:
        """Up to `room` (at least 1) decoded bytes from `data` plus what an earlier call left over."""
        data, self._pending = self._pending + data, b""
        if self._zlib is None:
            if len(data) > room:
                data, self._pending = data[:room], data[room:]
            return data
        try:
            out = self._zlib.decompress(data, room)
        except zlib.error:
            if not (self._first and self.encoding == "deflate"):
                raise UnreadableEncoding("the compressed body is corrupt") from None
            # Some servers send raw deflate without the zlib header; httpx tolerates it too.
            self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
            try:
                out = self._zlib.decompress(data, room)
            except zlib.error:
                raise UnreadableEncoding("the compressed body is corrupt") from None
        self._first = False
        self._pending = self._zlib.unconsumed_tail
        return out

    def has_pending(self) -> bool:
        return bool(self._pending)


class Decoding:
    """A body decoded as its raw chunks arrive, held to `limit` bytes.

    With `cut`, `feed` says stop once `limit` is reached and `value` is what was read (an excerpt);
    without it a body that would pass `limit` raises BodyTooLarge as soon as it does. Raw bytes
    count too, so a stream that never inflates to anything cannot run on forever either.
    """

    def __init__(self, encoding: str, limit: int, *, cut: bool) -> None:
        self._inflater = _Inflater(encoding)
        self._limit = limit
        self._cut = cut
        self._out = bytearray()
        self._raw = 0

    def feed(self, chunk: bytes) -> bool:
        """Take one raw chunk; True when nothing more should be read."""
        self._raw += len(chunk)
        data = chunk
        while True:
            room = self._limit - len(self._out)
            piece = self._inflater.feed(data, min(room + 1, STEP))
            data = b""
            self._out += piece
            if len(self._out) > self._limit:
                if not self._cut:
                    raise BodyTooLarge(self._limit)
                del self._out[self._limit :]
                return True
            if not piece or not self._inflater.has_pending():
                break
        if self._raw > self._limit:
            if not self._cut:
                raise BodyTooLarge(self._limit)
            return True
        return False

    def value(self) -> bytes:
        return bytes(self._out)


def content_encoding(headers: httpx.Headers) -> str:
    return str(headers.get("content-encoding", "")).strip().lower()


async def read_body(response: httpx.Response, limit: int, *, cut: bool = False) -> bytes:
    """The decoded body of a streamed response, at most `limit` bytes of it (see Decoding)."""
    try:
        # Already in memory (a response built in-process, as a mock transport returns): nothing
        # left to bound but the length.
        held = response.content
    except httpx.ResponseNotRead:
        pass
    else:
        if len(held) > limit and not cut:
            raise BodyTooLarge(limit)
        return held[:limit]
    # Even an empty body is read to its end: a response closed before that costs its connection.
    encoding = content_encoding(response.headers)
    declared = response.headers.get("content-length", "")
    decoding = Decoding(encoding, limit, cut=cut)
    if not cut and encoding in _IDENTITY and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    async for chunk in response.aiter_raw():
        if decoding.feed(chunk):
            break
    return decoding.value()


def without_entity_headers(headers: httpx.Headers) -> httpx.Headers:
    """`headers` without those describing the encoded body, which no longer match the decoded one."""
    if "content-encoding" not in headers:
        return headers  # an identity body: what they say of it is still true
    kept = httpx.Headers(headers)
    for name in _ENTITY_HEADERS:
        kept.pop(name, None)
    return kept
