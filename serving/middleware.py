"""ASGI guard in front of the BentoML app: bearer token (401), body size (413) and provider reporting."""

import hmac
import json
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from python_multipart.multipart import parse_options_header

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

OPEN_PATHS = ("/livez", "/healthz", "/readyz", "/metrics")
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
            content_type = headers.get(b"content-type", b"")
            problem = form_problem(content_type, body, self.forms[path])
            if problem is not None:
                return await send_json(send, problem[0], {"error": problem[1]})
            body = without_file_names(body, _boundary(content_type))
            scope = {**scope, "headers": _with_length(scope.get("headers") or [], len(body))}
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
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-medhub-provider", self.provider().encode())],
                }
            await send(message)

        return wrapped


MAX_PART_HEADER = 8 * 1024  # bytes of one part's header block; a browser or curl sends about 100
MAX_TEXT_FIELD = 64 * 1024  # bytes of a text field (a model id, layer list, format or DICOMweb reference)


def form_problem(content_type: bytes, body: bytes, allowed: set[str]) -> tuple[int, str] | None:
    """Why a form request cannot be served (status, message), or None when its fields are acceptable.

    Content-Disposition parameters are parsed as Starlette parses them (`filename=` may come before `name=`).
    Each field may appear once: BentoML reads the first `file` part (and would fetch a text one as a URL),
    Starlette refuses more than 1,000 parts or a text part over 1 MiB with an error that surfaces as a 500."""
    if not content_type.lower().startswith(b"multipart/form-data"):
        return 415, "expected a multipart/form-data upload with a 'file' field"
    boundary = _boundary(content_type)
    if boundary is None:
        return 400, "the multipart/form-data Content-Type names no boundary"
    fields: dict[str, bool] = {}
    for header, size in parts(body, boundary):
        if len(header) > MAX_PART_HEADER:
            return 400, f"a multipart part header is over {MAX_PART_HEADER // 1024} KiB"
        disposition = part_disposition(header)
        if disposition is None:
            continue
        name, is_upload = disposition
        if name in fields:
            return 400, f"form field {name!r} appears more than once; send each field once"
        if not is_upload and size > MAX_TEXT_FIELD:
            return 400, f"form field {name!r} is over {MAX_TEXT_FIELD // 1024} KiB"
        fields[name] = is_upload
    unknown = sorted(set(fields) - allowed)
    if unknown:
        return 400, f"unknown form field {unknown[0]!r}; expected {', '.join(sorted(allowed))}"
    if fields.get("dicomweb") is False:  # a reference to an image on a configured DICOMweb server
        return (400, "send either an uploaded 'file' or a 'dicomweb' reference, not both") if "file" in fields else None
    if not fields.get("file"):
        alternative = " (or a 'dicomweb' reference)" if "dicomweb" in allowed else ""
        return 400, f"missing form field 'file' holding the uploaded image or volume{alternative}"
    return None


UPLOAD_NAME = b"upload"  # what BentoML names its per-request temp file after, in place of the client's file name


def without_file_names(body: bytes, boundary: bytes) -> bytes:
    """The body with each upload part's Content-Disposition rewritten to carry the fixed file name `upload`.

    BentoML names the request's temp file after the client's file name (over ~240 characters: ENAMETOOLONG) and
    shows it in tracebacks; the name is never used, so it never passes the guard. Contents are copied untouched."""
    pieces, copied = [], 0
    for start, end in _header_spans(body, boundary):
        lines = body[start:end].split(b"\r\n")
        for i, line in enumerate(lines):
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-disposition":
                _, options = parse_options_header(value.strip())
                if b"filename" in options:
                    name = options.get(b"name", b"").replace(b"\\", b"").replace(b'"', b"")
                    lines[i] = b'Content-Disposition: form-data; name="' + name + b'"; filename="' + UPLOAD_NAME + b'"'
        pieces += [body[copied:start], b"\r\n".join(lines)]
        copied = end
    return b"".join(pieces) + body[copied:]


def part_disposition(header: bytes) -> tuple[str, bool] | None:
    """(field name, whether it is a file upload) from a part's Content-Disposition, or None without one."""
    for line in header.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-disposition":
            _, options = parse_options_header(value.strip())
            return options.get(b"name", b"").decode("utf-8", "replace"), b"filename" in options
    return None


def parts(body: bytes, boundary: bytes) -> Iterator[tuple[bytes, int]]:
    """(header block, content size) of each part of a multipart body; contents are skipped, not scanned, and a
    truncated last part has size -1."""
    for start, end, size in _part_spans(body, boundary):
        yield body[start:end], size


def _header_spans(body: bytes, boundary: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) offsets of each complete part header block."""
    for start, end, _ in _part_spans(body, boundary):
        if end - start <= MAX_PART_HEADER:
            yield start, end


def _part_spans(body: bytes, boundary: bytes) -> Iterator[tuple[int, int, int]]:
    """(header start, header end, content size) of each part; see `parts`."""
    delimiter = b"--" + boundary
    position = body.find(delimiter)
    while position != -1:
        start = position + len(delimiter)
        end = body.find(b"\r\n\r\n", start, start + MAX_PART_HEADER + 4)
        if body.startswith(b"--", start):  # the closing delimiter
            return
        if end == -1:  # a header block over the limit, or a truncated part
            if len(body) - start > MAX_PART_HEADER:
                yield start, start + MAX_PART_HEADER + 1, -1
            return
        position = body.find(b"\r\n" + delimiter, end)
        yield start, end, (position - end - 4 if position != -1 else -1)
        position = position + 2 if position != -1 else -1


def _boundary(content_type: bytes) -> bytes | None:
    found = BOUNDARY.search(content_type)
    return None if found is None else found.group(1) or found.group(2)


def _with_length(headers: list[tuple[bytes, bytes]], length: int) -> list[tuple[bytes, bytes]]:
    """The request headers with Content-Length set to the (rewritten) body's length, chunked framing dropped."""
    kept = [(k, v) for k, v in headers if k.lower() not in (b"content-length", b"transfer-encoding")]
    return [*kept, (b"content-length", str(length).encode())]


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive
