"""Images as flows, for the HTTP backends: an http(s) image fetched through the driver's
client (``ImageOptions.fetch_remote``), so the download is sync or async with the call that
needs it, and any image encoded for sending with the decoding off the event loop."""

from __future__ import annotations

import time
from functools import partial

import httpx

from ...images import Download, EncodedImage, ImageOptions, _labeled, encode_bytes, encode_for_fal
from ...types import Image
from .actions import Flow, close, offload, read, send


def download(url: str, options: ImageOptions, label: str) -> Flow[bytes]:
    """Fetch an http(s) image with :class:`~mantis_llm.images.Download`'s limits, through the
    driver's client: a request of its own, which never carries a backend's key.

    A failure raises an :class:`~mantis_llm.errors.ImageError`; the driver closes the open
    response when the flow ends.
    """
    with _labeled(label):
        dl = Download(url, options)
        while True:
            resp = yield from send(dl.request(), stream=True)
            if isinstance(resp, httpx.HTTPError):
                with dl.translate():
                    raise resp
            if dl.on_head(resp):
                yield from close(resp)
                continue
            while chunk := (yield from read(resp, max(dl.deadline - time.monotonic(), 0.001))):
                if isinstance(chunk, httpx.HTTPError):
                    with dl.translate():
                        raise chunk
                dl.on_chunk(chunk)
            yield from close(resp)
            return dl.finish()


def encode(image: Image, label: str, options: ImageOptions) -> Flow[str | EncodedImage]:
    """``image`` ready to send: an http(s) URL as it is (unless ``fetch_remote``: then
    downloaded), anything else as an :class:`~mantis_llm.images.EncodedImage`, downsized and
    re-encoded only when needed. Decoding and encoding run off the event loop."""
    if image.is_remote and not options.fetch_remote:
        assert image.url is not None
        return image.url  # passed through as it is: nothing to decode, no thread hop
    if image.is_remote:
        assert image.url is not None
        data = yield from download(image.url, options, label)
        encoded: EncodedImage = yield from offload(partial(encode_bytes, label=label), data, options)
        return encoded
    found = yield from offload(partial(encode_for_fal, label=label), image, options)
    assert isinstance(found, EncodedImage)  # only remote images pass through as strings
    return found
