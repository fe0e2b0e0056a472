"""Image fetching limits on the paths where *we* download image URLs: the local backend (every
URL) and the fal backend with ``fetch_remote=True`` (download, resize, send as data). Both use
ImageOptions(max_bytes=1 MiB, fetch_timeout=1 s, max_redirects=2) here. tests/core checks
``images.fetch`` itself; these tests go through ``generate``/``agenerate`` of each backend:
http(s) only (also after a redirect), connect and read timeouts, the size cap enforced while
the body streams (an endless body is cut off early), content-type and magic-byte checks,
and a limited number of redirects."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from mantis_llm import Conversation, FalBackend, GenerationParams, Request, errors
from mantis_llm.images import ImageOptions

LIMITS = dict(max_bytes=2**20, fetch_timeout=1.0, max_redirects=2)
SLACK = 1.0  # seconds over fetch_timeout allowed for scheduling noise


@pytest.fixture(params=["local", "fal"])
def backend(request, limited_backend, fresh_emu):
    """The local backend (session fixture with LIMITS), or a FalBackend fetching remote images."""
    if request.param == "local":
        assert limited_backend.image_options == ImageOptions(**LIMITS)
        yield limited_backend
    else:
        b = FalBackend(image_options=ImageOptions(fetch_remote=True, **LIMITS))
        yield b
        b.close()


def ask(backend, url: str, *, run_async: bool = False):
    req = Request(Conversation.from_prompt("What is it?", [url]), GenerationParams(max_tokens=2))
    if run_async:

        async def go():
            try:
                return await backend.agenerate(req)
            finally:
                if isinstance(backend, FalBackend):
                    await backend.aclose()

        return asyncio.run(go())
    return backend.generate(req)


def fails(backend, url: str, needle: str, *, run_async: bool = False) -> float:
    t0 = time.perf_counter()
    with pytest.raises(errors.ImageError) as ei:
        ask(backend, url, run_async=run_async)
    assert needle in str(ei.value)
    assert str(ei.value).startswith("image 1 of message 1: could not fetch http://127.0.0.1:")
    return time.perf_counter() - t0


def test_a_good_url_works(backend, other_host, fresh_emu):
    out = ask(backend, other_host.url + "/img/ok.png")
    assert out.text
    assert [s.path for s in other_host.seen] == ["/img/ok.png"]
    if isinstance(backend, FalBackend):  # fal got the image itself, as data, not our URL
        sent = fresh_emu.submissions[-1].payload["images"][0]["image_url"]
        assert sent.startswith("data:image/png;base64,")


@pytest.mark.parametrize(
    "path, needle",
    [
        ("/page.html", "the server sent text/html, not an image"),  # content-type check
        ("/fake.png", "got an HTML page"),  # says image/png, is HTML: magic-byte check
        ("/pdf", "got a PDF document"),  # octet-stream: the bytes decide
        ("/huge-declared", "the image is 1,000,000,000,000 bytes, more than the limit of 1,048,576"),
        ("/hop/3", "more than 2 redirects"),
        ("/loop", "more than 2 redirects"),
        ("/to-file", "redirected to a non-http(s) URL (file:)"),
        ("/missing", "HTTP 404"),
    ],
)
def test_refused_downloads(backend, other_host, path, needle):
    took = fails(backend, other_host.url + path, needle)
    assert took < 1.0


def test_redirects_up_to_the_limit_are_followed(backend, other_host):
    assert ask(backend, other_host.url + "/hop/2").text
    assert [s.path for s in other_host.seen] == ["/hop/2", "/hop/1", "/hop/0"]


@pytest.mark.parametrize("run_async", [False, True], ids=["sync", "async"])
def test_size_cap_is_enforced_while_streaming(backend, other_host, run_async):
    """An endless body (no Content-Length) is abandoned just past the cap, not read to the end."""
    took = fails(backend, other_host.url + "/endless", "more than the limit of 1,048,576 bytes", run_async=run_async)
    assert took < 2.0
    deadline = time.monotonic() + 3
    while not other_host.endless_sent and time.monotonic() < deadline:
        time.sleep(0.02)
    # the server stops when we hang up; what it got out is the cap plus socket buffers
    # (measured: 1.3-5.6 MB for a 1 MiB cap; unchecked, it would send 2 GB)
    assert other_host.endless_sent and other_host.endless_sent[0] < 16 * 2**20, other_host.endless_sent


@pytest.mark.parametrize("run_async", [False, True], ids=["sync", "async"])
def test_read_timeout(backend, other_host, run_async):
    took = fails(backend, other_host.url + "/stall", "timed out after 1 s", run_async=run_async)
    assert 1.0 <= took < 1.0 + SLACK


@pytest.fixture
def full_backlog():
    """A port whose accept queue is full: new connections hang in SYN_SENT (connect timeout)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(srv.getsockname())
        except BlockingIOError:
            pass
        fillers.append(c)
    time.sleep(0.1)
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    for c in fillers:
        c.close()
    srv.close()


def test_connect_timeout(backend, full_backlog):
    took = fails(backend, full_backlog + "/a.png", "timed out after 1 s")
    assert 1.0 <= took < 1.0 + SLACK
