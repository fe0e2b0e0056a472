"""Small encoded test images, made in memory (nothing is downloaded)."""

from __future__ import annotations

import io


def make_image_bytes(
    width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG"
) -> bytes:
    """A small encoded test image: a solid colour crossed by a white diagonal (not uniform,
    so resizing and encoding do real work). ``fmt`` is any format Pillow writes."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    img = PILImage.new("RGB", (width, height), color)
    ImageDraw.Draw(img).line((0, 0, width, height), fill=(255, 255, 255), width=3)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()
