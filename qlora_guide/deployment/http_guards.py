"""Checks on a request body before anything parses it: its media type, and its size.

:class:`BodyGuard` is a plain ASGI middleware. A body whose ``Content-Type``
is not JSON is a 415; one larger than the limit is a 413, answered from its
``Content-Length`` without reading it, or as soon as a chunked body passes
the limit. A body without a ``Content-Type`` is taken as JSON. The accepted
body is then replayed to the application, and later
``receive`` calls go to the server again, so that the application still
learns when its client disconnects.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from qlora_guide.deployment.api_errors import ApiError

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def is_json_media_type(value: str) -> bool:
    """Whether a ``Content-Type`` names JSON (``application/json``, or ``application/...+json``)."""
    media = value.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def header(scope: Scope, name: bytes) -> str | None:
    """The value of one request header, or None."""
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class BodyGuard:
    """Refuse non-JSON (415) and oversized (413) request bodies before the application reads them."""

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the body of an HTTP request, then hand the request on."""
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        error = self.header_error(scope)
        if error is None:
            body, error = await self.read_body(receive)
        if error is not None:
            await error.response()(scope, receive, send)
            return
        if body and header(scope, b"content-type") is None:  # a body without a media type is read as JSON
            scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}
        await self.app(scope, replay(body, receive), send)

    def header_error(self, scope: Scope) -> ApiError | None:
        """What is wrong with the body, as its headers tell: a media type that is not JSON, or a size above the limit."""
        content_type = header(scope, b"content-type")
        if content_type and not is_json_media_type(content_type):
            return ApiError(415, f"the request body is {content_type.split(';')[0]}: send application/json", code="unsupported_media_type")
        length = header(scope, b"content-length")
        if length and length.isdigit() and int(length) > self.max_body_bytes:
            return ApiError(413, f"the request body is {int(length)} bytes: at most {self.max_body_bytes} are accepted", code="request_too_large")
        return None

    async def read_body(self, receive: Receive) -> tuple[bytes, ApiError | None]:
        """The whole body, or the 413 to answer once it passes the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return b"", ApiError(400, "the client disconnected", code="invalid_request")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", ApiError(413, f"the request body is over {self.max_body_bytes} bytes: at most {self.max_body_bytes} are accepted", code="request_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that first gives ``body`` whole, then waits on the server (for ``http.disconnect``)."""
    sent = False

    async def receive_again() -> Message:
        """The buffered body once, then the server's next message."""
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again
