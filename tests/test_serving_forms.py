"""The guard's multipart check reads part headers only, never the uploaded bytes."""

import httpx

from serving.middleware import form_problem

ALLOWED = {"file", "model", "layers"}


def encoded(**fields) -> tuple[bytes, bytes]:
    """(Content-Type, body) exactly as an HTTP client sends them."""
    request = httpx.Request("POST", "http://127.0.0.1/embed", **fields)
    return request.headers["content-type"].encode(), request.read()


def test_a_file_and_known_fields_pass():
    content_type, body = encoded(files={"file": ("x.png", b"\x89PNG...")}, data={"model": "org/m", "layers": "1,2"})
    assert form_problem(content_type, body, ALLOWED) is None


def test_a_field_name_inside_the_uploaded_bytes_is_not_a_field():
    payload = b'\r\nContent-Disposition: form-data; name="evil"\r\n\r\n' * 3
    content_type, body = encoded(files={"file": ("x.dcm", payload)}, data={"model": "org/m"})
    assert form_problem(content_type, body, ALLOWED) is None


def test_unknown_field_and_missing_upload_are_named():
    content_type, body = encoded(files={"image": ("x.png", b"png")}, data={"model": "org/m"})
    assert form_problem(content_type, body, ALLOWED) == (400, "unknown form field 'image'; expected file, layers, model")
    content_type, body = encoded(files={"model": (None, b"org/m")})
    assert form_problem(content_type, body, ALLOWED)[1] == "missing form field 'file' holding the uploaded image or volume"
    content_type, body = encoded(files={"file": (None, b"/etc/passwd")})  # a string part, not an upload
    assert form_problem(content_type, body, ALLOWED)[0] == 400
    content_type, body = encoded(data={"file": "/etc/passwd", "model": "org/m"})  # not multipart at all
    assert form_problem(content_type, body, ALLOWED)[0] == 415


def test_quoted_boundary_and_missing_boundary():
    _, body = encoded(files={"file": ("x.png", b"png")})
    boundary = body[2 : body.index(b"\r\n")]
    assert form_problem(b'multipart/form-data; boundary="' + boundary + b'"', body, ALLOWED) is None
    assert form_problem(b"multipart/form-data", body, ALLOWED) == (400, "the multipart/form-data Content-Type names no boundary")
    assert form_problem(b"application/json", b"{}", ALLOWED)[0] == 415


def test_truncated_body_has_no_upload():
    content_type, body = encoded(files={"file": ("x.png", b"png")})
    assert form_problem(content_type, body[:30], ALLOWED)[0] == 400
