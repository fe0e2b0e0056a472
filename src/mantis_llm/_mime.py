"""Tell a file's type from its first bytes (magic numbers), never from its name.

The lowest layer of the package: imported by :mod:`mantis_llm.types` (``Image.mime_type``)
and :mod:`mantis_llm.images` (validation); imports nothing of ours.
"""

from __future__ import annotations

SUPPORTED_MIME = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp")
# What the other recognised types are, for error messages ("got a PDF document").
DESCRIBE = {
    "application/pdf": "a PDF document",
    "image/svg+xml": "an SVG image (vector images are not supported)",
    "text/html": "an HTML page",
    "application/xml": "an XML document",
    "text/plain": "text",
    "image/tiff": "a TIFF image",
    "image/heic": "a HEIC image",
    "image/avif": "an AVIF image",
    "image/x-icon": "an ICO icon",
}


def sniff_mime(data: bytes) -> str | None:
    """The mime type of ``data`` from its magic bytes (never from a name), or None.

    Besides the supported formats it recognises PDF, SVG, HTML, XML, TIFF, HEIC/AVIF, ICO
    and plain text, so errors can say what was given instead of an image.
    """
    if not data:
        return None
    head = bytes(data[:32])
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith(b"BM") and int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 64, 108, 124):
        return "image/bmp"  # "BM" plus a known DIB header size (so text starting "BM" is not a BMP)
    if head.startswith(b"%PDF"):
        return "application/pdf"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "image/avif"
        if brand in (b"heic", b"heix", b"mif1", b"msf1", b"hevc", b"heim", b"heis"):
            return "image/heic"
        return None
    if head.startswith(b"\x00\x00\x01\x00"):
        return "image/x-icon"
    text = bytes(data[:1024]).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<"):
        if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in text:
            return "text/html"
        if b"<svg" in text:
            return "image/svg+xml"
        if text.startswith(b"<?xml"):
            return "application/xml"
    sample = bytes(data[:1024])
    if b"\x00" in sample:
        return None
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as exc:  # a multi-byte character cut at the sample's end is fine
        if exc.start < len(sample) - 3:
            return None
    return "text/plain"


def describe(mime: str | None) -> str:
    """How an error names data of this type: "a PDF document", or the type itself."""
    if mime is None:
        return "not a recognised image format"
    return DESCRIBE.get(mime, mime)
