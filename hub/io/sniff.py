"""Recognise an input's format from its first bytes, never from its file name."""

from __future__ import annotations

import struct
import zlib

PNG = "png"
JPEG = "jpeg"
DICOM = "dicom"
NIFTI = "nifti"
NIFTI_GZ = "nifti-gz"

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HEAD_BYTES = 4096
"""How many leading bytes :func:`sniff` needs."""


def _is_nifti_header(head: bytes) -> bool:
    if len(head) < 348:
        return False
    for order in "<>":
        size = struct.unpack_from(order + "i", head, 0)[0]
        if size == 348 and head[344:347] in (b"n+1", b"ni1"):
            return True
        if size == 540 and len(head) >= 540 and head[4:7] in (b"n+2", b"ni2"):
            return True
    return False


def _looks_like_raw_dicom(head: bytes) -> bool:
    """A DICOM data set written without the 128-byte preamble starts with a group 0x0002 or 0x0008 element."""
    if len(head) < 8:
        return False
    group, element = struct.unpack_from("<HH", head, 0)
    return group in (0x0002, 0x0008) and element < 0x0100 and (head[4:6].isalpha() or head[6:8] == b"\x00\x00")


def gunzip_head(data: bytes, n: int = HEAD_BYTES) -> bytes:
    """Up to ``n`` decompressed bytes from the start of a gzip stream, never inflating more than that."""
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, n)
    except zlib.error:
        return b""


def sniff(head: bytes) -> str | None:
    """Return the format of data starting with ``head`` (one of the constants above), or None.

    ``head`` should hold at least :data:`HEAD_BYTES` bytes (fewer when the whole input is shorter); a gzip
    stream is only accepted when what it holds is a NIfTI header.
    """
    if head.startswith(PNG_SIGNATURE):
        return PNG
    if head.startswith(b"\xff\xd8\xff"):
        return JPEG
    if len(head) >= 132 and head[128:132] == b"DICM":
        return DICOM
    if head.startswith(b"\x1f\x8b"):
        return NIFTI_GZ if _is_nifti_header(gunzip_head(head)) else None
    if _is_nifti_header(head):
        return NIFTI
    if _looks_like_raw_dicom(head):
        return DICOM
    return None
