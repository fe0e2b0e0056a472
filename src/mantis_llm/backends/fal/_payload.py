"""The endpoint's input JSON: the prompt, the images (downloaded, encoded or uploaded to
fal storage as needed) and the generation parameters the user set."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any

import httpx
from pydantic import SecretStr

from ...errors import AuthenticationError, BackendError
from ...images import EncodedImage, ImageOptions
from ...prompt import IMAGE_TOKEN, render
from ...types import Image
from .._http.actions import Flow
from .._http.download import encode
from .._http.responses import json_body
from ._call import Call
from ._config import CdnToken

logger = logging.getLogger("mantis_llm.fal")

# A 64x64 white PNG (134 bytes): what a text-only question carries to an endpoint that
# requires an image (see FalBackend's ``text_only``), with a note telling the model to ignore it.
BLANK_IMAGE = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAEAAAABACAIAAAAlC+aJAAAATUlEQVR42u3PQQ0AAAgEILV/5zOFDzdoQCepz6aeE"
    "xAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQELi3cqoDfaKuZM4AAAAASUVORK5CYII="
)
BLANK_NOTE = (
    "(System note: the image above is a blank placeholder, sent only because this endpoint requires an "
    "image; ignore it and answer from the text alone.)"
)


def token_from_response(data: Any, now: float) -> CdnToken:
    """The CDN token from ``/storage/auth/token``, valid until a minute before ``expires_at``."""
    if not isinstance(data, dict) or not data.get("token"):
        raise BackendError("fal storage answered without an upload token")
    ttl = 600.0
    raw = data.get("expires_at")
    if isinstance(raw, str):
        try:
            exp = datetime.fromisoformat(raw.replace("Z", "+00:00"))
            if exp.tzinfo is None:
                exp = exp.replace(tzinfo=timezone.utc)
            ttl = exp.timestamp() - time.time()
        except ValueError:
            pass
    header = f"{data.get('token_type') or 'Bearer'} {data['token']}"
    return CdnToken(SecretStr(header), now + max(0.0, ttl - 60.0))


def encode_image(image: Image, label: str, call: Call, options: ImageOptions) -> Flow[str | EncodedImage]:
    """One image as a URL or data URI string, or an :class:`EncodedImage` too large for a
    data URI (to be uploaded). Decoding and encoding run off the event loop."""
    enc = yield from encode(image, label, options)
    if isinstance(enc, str):
        return enc
    uri = enc.data_uri()
    return uri if len(uri) <= call.cfg.upload_threshold else enc


def upload(call: Call, enc: EncodedImage) -> Flow[str]:
    """Upload one encoded image to fal storage (v3 CDN flow), cached by content hash."""
    digest = enc.sha256
    cached = call.state.uploads.get(digest)
    if cached:
        logger.debug("fal upload: cache hit for %s", digest[:12])
        return cached
    cfg = call.cfg
    for attempt in range(2):
        token = call.state.token
        if token is None or token.expires <= call.clock():
            resp = yield from call.step(
                "storage token",
                "idempotent",
                lambda t: cfg.build(
                    "POST",
                    f"{cfg.rest_url}/storage/auth/token",
                    params={"storage_type": "fal-cdn-v3"},
                    json={},
                    timeout=t,
                ),
            )
            token = call.state.token = token_from_response(json_body(resp), call.clock())
        ext = enc.mime_type.split("/")[-1]
        headers = {
            "Authorization": token.header.get_secret_value(),  # the storage token, never our key
            "Content-Type": enc.mime_type,
            "X-Fal-File-Name": f"{digest[:16]}.{ext}",
        }

        def build(t: float, headers: dict[str, str] = headers) -> httpx.Request:
            return cfg.build(
                "POST", f"{cfg.cdn_url}/files/upload", key_auth=False, content=enc.data, timeout=t, headers=headers
            )

        try:
            resp = yield from call.step("upload", "idempotent", build, cap=None)
        except AuthenticationError:
            if attempt:
                raise
            call.state.token = None  # the token expired early or was revoked: fetch a new one once
            continue
        data = json_body(resp)
        if not isinstance(data, dict) or not isinstance(data.get("access_url"), str):
            raise BackendError("fal storage upload returned no access_url")
        call.metrics["uploads"] += 1
        call.state.uploads[digest] = data["access_url"]
        logger.debug("fal upload: %d bytes -> %s", len(enc.data), data["access_url"])
        return data["access_url"]
    raise AssertionError("unreachable")


def build_payload(call: Call, options: ImageOptions) -> Flow[dict[str, Any]]:
    """The endpoint's input JSON: prompt, images (uploading large ones), and the params set."""
    rendered = render(call.request.conversation, "fal")
    urls = []
    for label, image in rendered.labeled_images:
        item = yield from encode_image(image, label, call, options)
        urls.append(item if isinstance(item, str) else (yield from upload(call, item)))
    payload: dict[str, Any] = {"prompt": rendered.text, "images": [{"image_url": u} for u in urls]}
    # Only what the user set; fal's defaults apply to the rest. The LLaVA endpoints at fal
    # name the length limit "max_tokens" (one older page says "max_new_tokens"; pass that
    # through extra_input if an endpoint needs it).
    params = call.request.params
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        value = getattr(params, name)
        if value is not None:
            payload[name] = value
    payload.update(call.cfg.extra_input)
    return payload


def with_placeholder(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` (text only) with the blank placeholder image and, before the text, the note
    that it is blank and to be ignored."""
    return {
        **payload,
        "prompt": f"{IMAGE_TOKEN} {BLANK_NOTE}\n\n{payload['prompt']}",
        "images": [{"image_url": BLANK_IMAGE}],
    }
