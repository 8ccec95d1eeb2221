"""ASGI guard in front of the BentoML app: bearer token (401), body size (413) and provider reporting."""

import hmac
import json
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

OPEN_PATHS = ("/livez", "/healthz", "/readyz", "/metrics")
PART_HEADER = re.compile(rb'content-disposition:\s*form-data;\s*name="([^"]*)"(;\s*filename=)?', re.IGNORECASE)
BOUNDARY = re.compile(rb'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)


async def send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """Refuses requests before BentoML parses them: a wrong or missing token when one is configured (401), a
    declared `Content-Length` or a streamed body over the limit (413), and for the form routes in `forms`
    anything but a multipart body whose fields are known and include the `file` upload (415/400).
    `/readyz` answers carry `x-medhub-provider` (the ONNX Runtime provider the models run on)."""

    def __init__(
        self, app: Any, max_body_bytes: int, token: str | None, provider: Callable[[], str], forms: dict[str, set[str]]
    ):
        self.app, self.max_body_bytes, self.token, self.provider = app, max_body_bytes, token, provider
        self.forms = forms

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path == "/readyz":
            return await self.app(scope, receive, self._with_provider(send))
        if path in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.token and not self._authorised(headers.get(b"authorization", b"")):
            return await send_json(send, 401, {"error": "missing or wrong bearer token in the Authorization header"})
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._too_large(send)
        if scope.get("method") != "POST" or (declared is not None and path not in self.forms):
            return await self.app(scope, receive, send)
        body = await self._read_bounded(receive)
        if body is None:
            return await self._too_large(send)
        if path in self.forms:
            problem = form_problem(headers.get(b"content-type", b""), body, self.forms[path])
            if problem is not None:
                return await send_json(send, problem[0], {"error": problem[1]})
        return await self.app(scope, _replay(body), send)

    def _authorised(self, header: bytes) -> bool:
        expected = f"Bearer {self.token}".encode()
        return hmac.compare_digest(header, expected)

    async def _too_large(self, send: Send) -> None:
        limit_mb = self.max_body_bytes / (1024 * 1024)
        await send_json(send, 413, {"error": f"request body is over the limit of {limit_mb:g} MiB"})

    async def _read_bounded(self, receive: Receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def _with_provider(self, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-medhub-provider", self.provider().encode())]}
            await send(message)

        return wrapped


def form_problem(content_type: bytes, body: bytes, allowed: set[str]) -> tuple[int, str] | None:
    """Why a form request cannot be served (status, message), or None when its fields are acceptable."""
    if not content_type.lower().startswith(b"multipart/form-data"):
        return 415, "expected a multipart/form-data upload with a 'file' field"
    boundary = BOUNDARY.search(content_type)
    if boundary is None:
        return 400, "the multipart/form-data Content-Type names no boundary"
    fields = {}
    for header in part_headers(body, boundary.group(1) or boundary.group(2)):
        match = PART_HEADER.search(header)
        if match is not None:
            fields[match.group(1).decode("utf-8", "replace")] = bool(match.group(2))
    unknown = sorted(set(fields) - allowed)
    if unknown:
        return 400, f"unknown form field {unknown[0]!r}; expected {', '.join(sorted(allowed))}"
    if fields.get("dicomweb") is False:  # a reference to an image on a configured DICOMweb server
        return (400, "send either an uploaded 'file' or a 'dicomweb' reference, not both") if "file" in fields else None
    if not fields.get("file"):
        alternative = " (or a 'dicomweb' reference)" if "dicomweb" in allowed else ""
        return 400, f"missing form field 'file' holding the uploaded image or volume{alternative}"
    return None


def part_headers(body: bytes, boundary: bytes) -> Iterator[bytes]:
    """The header block of each part of a multipart body; part contents are skipped, not scanned."""
    delimiter = b"--" + boundary
    position = body.find(delimiter)
    while position != -1:
        start = position + len(delimiter)
        end = body.find(b"\r\n\r\n", start)
        if body.startswith(b"--", start) or end == -1:  # the closing delimiter, or a truncated part
            return
        yield body[start:end]
        position = body.find(b"\r\n" + delimiter, end)
        position = position + 2 if position != -1 else -1


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive
