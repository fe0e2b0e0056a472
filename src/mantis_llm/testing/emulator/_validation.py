"""The endpoint's input validation, answered the way fal's pydantic apps answer: a 422
with ``[{loc, msg, type, ctx?}]``."""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

IMAGE_MIMES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp")
_DATA_URI = re.compile(r"data:([\w.+-]+/[\w.+-]+)((?:;[\w.+-]+=[\w.+-]+)*);base64,(.*)", re.S)

ImageCheck = Callable[[str], "tuple[str, str] | None"]


def error(loc: list[Any], msg: str, type_: str, **ctx: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"loc": ["body", *loc], "msg": msg, "type": type_}
    if ctx:
        d["ctx"] = ctx
    return d


def validate(raw: bytes, check_image: ImageCheck, *, require_images: bool = True) -> tuple[Any, list[dict[str, Any]]]:
    """(body, errors) for one input JSON; ``check_image(url)`` judges each image reference.

    ``require_images``: the endpoint wants at least one image (an empty list is a 422), as
    the live endpoint may; False accepts ``"images": []`` for text-only questions.
    """
    try:
        body = json.loads(raw or b"null")
    except ValueError as exc:
        return None, [error([0], f"JSON decode error: {exc}", "json_invalid")]
    if not isinstance(body, dict):
        return body, [error([], "Input should be a valid dictionary", "dict_type")]
    errors: list[dict[str, Any]] = []
    prompt = body.get("prompt")
    if "prompt" not in body:
        errors.append(error(["prompt"], "Field required", "missing"))
    elif not isinstance(prompt, str):
        errors.append(error(["prompt"], "Input should be a valid string", "string_type"))
    elif not prompt.strip():
        errors.append(error(["prompt"], "String should have at least 1 character", "string_too_short"))
    images = body.get("images")
    if "images" not in body:
        errors.append(error(["images"], "Field required", "missing"))
    elif not isinstance(images, list):
        errors.append(error(["images"], "Input should be a valid list", "list_type"))
    elif not images and require_images:
        errors.append(
            error(["images"], "List should have at least 1 item after validation, not 0", "too_short", min_length=1)
        )
    else:
        for i, img in enumerate(images):
            if not isinstance(img, dict):
                errors.append(error(["images", i], "Input should be a valid dictionary", "dict_type"))
            elif "image_url" not in img:
                errors.append(error(["images", i, "image_url"], "Field required", "missing"))
            elif not isinstance(img["image_url"], str):
                errors.append(error(["images", i, "image_url"], "Input should be a valid string", "string_type"))
            else:
                problem = check_image(img["image_url"])
                if problem:
                    errors.append(error(["images", i, "image_url"], problem[0], problem[1]))
    for name in ("max_tokens", "max_new_tokens", "seed"):
        v = body.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            errors.append(error([name], "Input should be a valid integer", "int_type"))
        elif v is not None and name != "seed" and v <= 0:
            errors.append(error([name], "Input should be greater than 0", "greater_than", gt=0))
    for name, lo, lo_incl, hi in (("temperature", 0, True, 2), ("top_p", 0, False, 1)):
        v = body.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            errors.append(error([name], "Input should be a valid number", "float_type"))
        elif v < lo or (v == lo and not lo_incl):
            op, word = (
                ("greater_than_equal", "greater than or equal to") if lo_incl else ("greater_than", "greater than")
            )
            errors.append(error([name], f"Input should be {word} {lo}", op, **{"ge" if lo_incl else "gt": lo}))
        elif v > hi:
            errors.append(error([name], f"Input should be less than or equal to {hi}", "less_than_equal", le=hi))
    return body, errors


def check_image(url: str, cdn_url: str, find_file: Callable[[str], bytes | None]) -> tuple[str, str] | None:
    """(msg, type) when ``url`` is not a usable image reference: a data URI must decode to an
    image, a CDN URL must name an uploaded file, anything else must be an http(s) URL."""
    data: bytes | None = None
    if url.startswith("data:"):
        m = _DATA_URI.fullmatch(url)
        if not m:
            return "Invalid data URI: expected data:<mime>;base64,<data>", "image_load_error"
        if m.group(1).lower() not in IMAGE_MIMES:
            return f"Unsupported image type {m.group(1)!r}", "image_load_error"
        try:
            data = base64.b64decode(m.group(3), validate=True)
        except (binascii.Error, ValueError):
            return "Invalid base64 data in data URI", "image_load_error"
    elif url.startswith(cdn_url + "/files/"):
        data = find_file(url[len(cdn_url) + len("/files/") :])
        if data is None:
            return f"Failed to download the file from {url}", "file_download_error"
    elif urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
        return "Input should be a valid URL (http, https or a base64 data URI)", "url_parsing"
    if data is not None:
        try:
            from PIL import Image as PILImage

            with PILImage.open(io.BytesIO(data)) as im:
                im.verify()
        except Exception:
            return "Failed to load the image: cannot identify image file", "image_load_error"
    return None
