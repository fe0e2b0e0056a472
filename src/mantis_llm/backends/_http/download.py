"""An http(s) image fetched as a flow, through the driver's client, so the download is sync
or async with the call that needs it (``ImageOptions.fetch_remote``)."""

from __future__ import annotations

import time

import httpx

from ...images import Download, ImageOptions, _labeled
from .actions import Flow, close, read, send


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
