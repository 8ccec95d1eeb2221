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
    assert form_problem(content_type, body, ALLOWED) == (
        400,
        "unknown form field 'image'; expected file, layers, model",
    )
    content_type, body = encoded(files={"model": (None, b"org/m")})
    assert (
        form_problem(content_type, body, ALLOWED)[1] == "missing form field 'file' holding the uploaded image or volume"
    )
    content_type, body = encoded(files={"file": (None, b"/etc/passwd")})  # a string part, not an upload
    assert form_problem(content_type, body, ALLOWED)[0] == 400
    content_type, body = encoded(data={"file": "/etc/passwd", "model": "org/m"})  # not multipart at all
    assert form_problem(content_type, body, ALLOWED)[0] == 415


def test_quoted_boundary_and_missing_boundary():
    _, body = encoded(files={"file": ("x.png", b"png")})
    boundary = body[2 : body.index(b"\r\n")]
    assert form_problem(b'multipart/form-data; boundary="' + boundary + b'"', body, ALLOWED) is None
    assert form_problem(b"multipart/form-data", body, ALLOWED) == (
        400,
        "the multipart/form-data Content-Type names no boundary",
    )
    assert form_problem(b"application/json", b"{}", ALLOWED)[0] == 415


def test_truncated_body_has_no_upload():
    content_type, body = encoded(files={"file": ("x.png", b"png")})
    assert form_problem(content_type, body[:30], ALLOWED)[0] == 400


def raw_form(*parts: tuple[bytes, bytes]) -> tuple[bytes, bytes]:
    """(Content-Type, body) from (part header block, content) pairs written byte for byte."""
    boundary = b"b0undary"
    body = b"".join(b"--" + boundary + b"\r\n" + header + b"\r\n\r\n" + content + b"\r\n" for header, content in parts)
    return b"multipart/form-data; boundary=" + boundary, body + b"--" + boundary + b"--\r\n"


UPLOAD = (b'Content-Disposition: form-data; name="file"; filename="x.png"', b"\x89PNG...")
MODEL = (b'Content-Disposition: form-data; name="model"', b"org/m")


def test_filename_before_name_is_an_upload():
    content_type, body = raw_form((b'Content-Disposition: form-data; filename="x.png"; name="file"', b"png"), MODEL)
    assert form_problem(content_type, body, ALLOWED) is None
    content_type, body = raw_form((b"content-disposition: form-data; name=file; filename=x.png", b"png"), MODEL)
    assert form_problem(content_type, body, ALLOWED) is None


def test_a_text_file_part_before_the_upload_is_refused():
    url = (b'Content-Disposition: form-data; name="file"', b"http://169.254.169.254/latest/meta-data")
    for order in ((url, UPLOAD, MODEL), (UPLOAD, url, MODEL), (UPLOAD, UPLOAD, MODEL)):
        content_type, body = raw_form(*order)
        assert form_problem(content_type, body, ALLOWED) == (
            400,
            "form field 'file' appears more than once; send each field once",
        )


def test_forms_starlette_refuses_get_a_400_here():
    content_type, body = raw_form(UPLOAD, *[MODEL] * 1001)  # over Starlette's 1,000 fields
    assert form_problem(content_type, body, ALLOWED)[0] == 400
    content_type, body = raw_form(UPLOAD, *[UPLOAD] * 1001)  # over its 1,000 files
    assert form_problem(content_type, body, ALLOWED)[0] == 400
    huge_header = (b'Content-Disposition: form-data; name="file"; filename="x.png"\r\nX-Pad: ' + b"a" * 2**20, b"png")
    content_type, body = raw_form(huge_header, MODEL)
    assert form_problem(content_type, body, ALLOWED) == (400, "a multipart part header is over 8 KiB")
    content_type, body = raw_form(UPLOAD, (MODEL[0], b"m" * (2**20 + 1)))  # a text part over its 1 MiB
    assert form_problem(content_type, body, ALLOWED) == (400, "form field 'model' is over 64 KiB")


def test_upload_file_names_are_replaced_and_the_body_stays_well_formed():
    from serving.middleware import UPLOAD_NAME, parts, without_file_names

    canary = "CANARY" + "x" * 300 + ".dcm"
    content_type, body = encoded(
        files={"file": (canary, b"\x00DICM" * 10, "application/dicom")}, data={"model": "org/m"}
    )
    boundary = content_type.split(b"boundary=")[1]
    rewritten = without_file_names(body, boundary)
    assert b"CANARY" not in rewritten and b'filename="' + UPLOAD_NAME + b'"' in rewritten
    assert b"\x00DICM" * 10 in rewritten and b"application/dicom" in rewritten
    assert form_problem(content_type, rewritten, ALLOWED) is None
    assert [size for _, size in parts(rewritten, boundary)] == [size for _, size in parts(body, boundary)]
    assert without_file_names(body[:40], boundary) == body[:40]  # a truncated header block is left as it is
