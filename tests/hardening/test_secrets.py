"""Secret hygiene: with a recognisable FAL_KEY, run every code path (successes in every mode,
each error, uploads, remote fetches, the CLI) with DEBUG logging on httpx, httpcore, our
loggers and everything else, LangChain callbacks and LlamaIndex instrumentation recorded;
render every public object (repr, str, model_dump, JSON, LangChain serialization) and every
exception (str, repr, detail, formatted traceback with its chained causes); then assert the
key, its id and its secret appear nowhere. And: the key only ever travels to fal's routes,
never to another host (an image server), not even when we fetch images from it."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import traceback
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.load import dumpd, dumps
from langchain_core.messages import HumanMessage
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, TextBlock
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.schema import ImageDocument

from mantis_llm import Conversation, FalBackend, GenerationParams, Request, TransformersBackend, cli, errors
from mantis_llm.emulator import HANG, FalEmulator, JobError
from mantis_llm.images import ImageOptions
from mantis_llm.langchain import ChatMantis
from mantis_llm.llama_index import Mantis, MantisMultiModal

from .conftest import FAL_ENV, png

KEY_ID, KEY_SECRET = "sekrit-ID-1234", "sekrit-SECRET-5678"
SECRET = f"{KEY_ID}:{KEY_SECRET}"
NEEDLES = (SECRET, KEY_ID, KEY_SECRET, base64.b64encode(SECRET.encode()).decode())
FAL_ROUTES = {"submit", "status", "stream", "result", "cancel", "run", "run_stream", "token"}
LOGGERS = ("", "httpx", "httpcore", "hpack", "mantis_llm", "mantis_llm.fal", "mantis_llm.local", "mantis_llm.llama_index",
           "mantis_llm.emulator", "langchain_core", "llama_index", "asyncio", "urllib3", "PIL")  # fmt: skip


class Recorder(BaseCallbackHandler):
    """A LangChain handler that keeps the text of every callback's arguments."""

    def __init__(self, sink: list[str]) -> None:
        self.sink = sink

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("on_"):
            sink = object.__getattribute__(self, "sink")
            return lambda *a, **kw: sink.append(f"{name} {a!r} {kw!r}")
        return object.__getattribute__(self, name)


class EventRecorder(BaseEventHandler):
    sink: list = []

    @classmethod
    def class_name(cls) -> str:
        return "EventRecorder"

    def handle(self, event, **kwargs) -> None:
        self.sink.append(f"{event!r} {event.model_dump_json()}")


def render_exception(exc: BaseException) -> str:
    parts = [str(exc), repr(exc), repr(getattr(exc, "detail", None)), repr(exc.args)]
    parts += traceback.format_exception(exc)
    return "\n".join(parts)


def expect(exc_type, fn, texts: list[str]) -> BaseException:
    with pytest.raises(exc_type) as ei:
        fn()
    texts.append(render_exception(ei.value))
    return ei.value


@pytest.fixture
def secret_emu(monkeypatch):
    with FalEmulator(key=SECRET, service_time=0.01) as fresh_emu:
        for name in FAL_ENV:
            monkeypatch.delenv(name, raising=False)
        for name, value in fresh_emu.env().items():
            monkeypatch.setenv(name, value)
        yield fresh_emu


def test_the_key_appears_nowhere(secret_emu, other_host, limited_backend, closed_port, caplog, capfd, monkeypatch):
    fresh_emu = secret_emu
    texts: list[str] = []
    made: list = []

    def keep(obj):
        made.append(obj)
        return obj

    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name or None)
    handler = Recorder(texts)
    events = EventRecorder()
    events.sink = texts
    dispatcher = get_dispatcher()
    dispatcher.add_event_handler(events)
    img_url = other_host.url + "/img/a.png"  # another host: passed through, or fetched by us
    image = png(48, 32)
    lc_msg = [HumanMessage(content=[{"type": "image", "url": img_url}, {"type": "image", "base64": base64.b64encode(image).decode(),
                                                                       "mime_type": "image/png"}, "Compare them."])]  # fmt: skip
    li_msg = [ChatMessage(role="user", blocks=[ImageBlock(url=img_url), TextBlock(text="What is it?")])]
    try:
        # ---- successes: LangChain (queue, stream mode, batch, async), explicit key and env key
        chat = keep(ChatMantis(api_key=SECRET, callbacks=[handler], backend_options={"with_logs": True}))
        texts.append(repr(chat.invoke(lc_msg)))
        streaming = keep(ChatMantis(backend_options={"mode": "stream"}))
        texts += [repr(c) for c in streaming.stream(lc_msg, config={"callbacks": [handler]})]
        texts += [repr(m) for m in chat.batch([lc_msg, lc_msg])]

        async def in_loop(model, coro):
            try:
                return await coro
            finally:
                await model.aclose()  # the loop's pooled connections

        texts.append(repr(asyncio.run(in_loop(chat, chat.ainvoke(lc_msg)))))
        fetching = keep(ChatMantis(backend_options={"image_options": ImageOptions(fetch_remote=True)}))
        texts.append(repr(fetching.invoke(lc_msg)))  # we download the image from the other host
        # ---- LlamaIndex: chat, stream, async, complete, the legacy class
        llm = keep(Mantis(api_key=SECRET, backend_options={"with_logs": True}))
        texts.append(repr(llm.chat(li_msg)))
        texts += [repr(r) for r in llm.stream_chat(li_msg)]
        texts.append(repr(asyncio.run(in_loop(llm, llm.achat(li_msg)))))
        texts.append(repr(llm.complete("Describe", image_documents=[ImageDocument(image_url=img_url)])))
        legacy = keep(MantisMultiModal())
        texts.append(repr(legacy.complete("Describe", image_documents=[ImageBlock(image=image)])))
        # ---- the backend itself: sync mode, uploads (Bearer token to the CDN, never the key)
        fal = keep(FalBackend(mode="sync", upload_threshold=100))
        texts.append(repr(fal.generate(Request(Conversation.from_prompt("Describe", [image])))))
        assert any(r.route == "upload" for r in fresh_emu.requests)
        # ---- FAL_KEY_ID + FAL_KEY_SECRET instead of FAL_KEY
        monkeypatch.delenv("FAL_KEY")
        monkeypatch.setenv("FAL_KEY_ID", KEY_ID)
        monkeypatch.setenv("FAL_KEY_SECRET", KEY_SECRET)
        split = keep(FalBackend())
        texts.append(repr(split.generate(Request(Conversation.from_prompt("Split key", [img_url])))))
        monkeypatch.setenv("FAL_KEY", SECRET)
        # ---- the local backend fetching an image (FAL_KEY is set: it must not travel)
        texts.append(
            repr(
                limited_backend.generate(
                    Request(Conversation.from_prompt("hi", [img_url]), GenerationParams(max_tokens=2))
                )
            )
        )
        # ---- the CLI, verbose, success and failure
        assert cli.main(["ask", img_url, "-p", "What is it?", "-v", "--json"]) == 0
        assert (
            cli.main(["ask", img_url, "-p", "What is it?", "--model", "fal-ai/nothing-here"]) == 1
        )  # a backend failure

        # ---- every error path
        req = lambda: Request(Conversation.from_prompt("Describe", [img_url]))  # noqa: E731
        b = keep(FalBackend(max_retries=0, timeout=5))
        as_is = keep(ChatMantis(api_key=SECRET, backend_options={"text_only": "as_is"}))
        expect(errors.InvalidRequestError, lambda: as_is.invoke([HumanMessage("no image")]), texts)  # 422
        gone = keep(ChatMantis(model="fal-ai/gone"))
        expect(errors.EndpointNotFoundError, lambda: gone.invoke(lc_msg), texts)  # 404
        fresh_emu.script([JobError(500, "Runner crashed", "runner_server_error")])
        expect(errors.BackendError, lambda: llm.chat(li_msg), texts)
        fresh_emu.inject("500", route="result")
        expect(errors.BackendError, lambda: b.generate(req()), texts)
        fresh_emu.inject("429", route="submit")
        expect(errors.RateLimitError, lambda: b.generate(req()), texts)
        fresh_emu.inject("drop", route="submit")
        expect(errors.BackendError, lambda: b.generate(req()), texts)  # ambiguous submit
        fresh_emu.inject("503", route="run")
        sync = keep(FalBackend(mode="sync", max_retries=0))
        expect(errors.BackendError, lambda: sync.generate(req()), texts)
        fresh_emu.script([HANG])
        hurried = keep(ChatMantis(timeout=0.3))
        expect(errors.RequestTimeoutError, lambda: hurried.invoke(lc_msg), texts)
        nowhere = keep(FalBackend(queue_url=f"http://127.0.0.1:{closed_port}"))
        err = expect(errors.BackendError, lambda: nowhere.generate(req()), texts)
        assert err.__cause__ is not None  # the httpx error is chained (and rendered above)
        streamer = keep(FalBackend(mode="stream", text_only="as_is"))  # the endpoint's 422, as is
        expect(
            errors.InvalidRequestError, lambda: streamer.generate(Request(Conversation.from_prompt("no image"))), texts
        )
        html = [HumanMessage(content=[{"type": "image", "url": other_host.url + "/page.html"}, "hi"])]
        expect(errors.ImageError, lambda: fetching.invoke(html), texts)
        fresh_emu.key = "someone-else:entirely"  # our key is now the wrong one: 401
        expect(errors.AuthenticationError, lambda: chat.invoke(lc_msg), texts)
        expect(errors.AuthenticationError, lambda: asyncio.run(in_loop(llm, llm.achat(li_msg))), texts)
        assert cli.main(["ask", img_url, "-p", "hi"]) == 2
        fresh_emu.key = SECRET

        # ---- every public object, every way it can be shown or serialized
        backend = chat.get_backend()
        for obj in (chat, fetching, llm, legacy, backend, fal, limited_backend):
            texts += [repr(obj), str(obj), repr(vars(obj))]
        texts.append(repr(backend._config))
        for model in (chat, llm, legacy):
            texts += [repr(model.model_dump()), model.model_dump_json(), json.dumps(model.model_dump(mode="json"))]
        texts += [dumps(chat), dumps(chat, pretty=True), json.dumps(dumpd(chat)), repr(chat.to_json())]
        texts += [repr(chat._identifying_params), repr(chat._get_ls_params())]
        texts += [llm.to_json(), repr(llm.to_dict()), repr(llm.metadata), legacy.to_json(), repr(legacy.to_payload())]
        texts.append(repr(TransformersBackend(model="x")))
    finally:
        dispatcher.event_handlers.remove(events)
        for obj in made:
            obj.close()

    out, err_out = capfd.readouterr()
    texts += [out, err_out, caplog.text]
    texts += [f"{r.name} {r.getMessage()} {r.args!r} {r.exc_text}" for r in caplog.records]
    blob = "\n".join(texts)

    # the recorders really saw these paths (so an empty capture cannot pass)
    assert "HTTP Request: POST" in blob and "send_request_headers" in blob  # httpx and httpcore DEBUG
    assert "fal submit: request" in blob and "fal upload" in blob  # our own DEBUG lines
    assert "on_chat_model_start" in blob and "LLMChatStartEvent" in blob and "MantisUpdateEvent" in blob
    for seen in ("Runner crashed", "ConnectError", "[in_progress]"):
        assert seen in blob, seen
    assert '"type": "secret"' in blob  # dumps() kept the key as a secret reference
    for needle in NEEDLES:
        assert needle not in blob, f"{needle!r} leaked"

    # the key went to fal's routes (and was used), never anywhere else
    keyed = [r for r in fresh_emu.requests if r.route in FAL_ROUTES]
    assert len(keyed) > 30 and all(r.headers.get("authorization") == f"Key {SECRET}" for r in keyed)
    others = [r for r in fresh_emu.requests if r.route not in FAL_ROUTES]
    assert {r.route for r in others} >= {"upload"}
    for r in others:
        assert not any(n in json.dumps(r.headers) for n in NEEDLES), r.route
        assert not r.headers.get("authorization", "").startswith("Key")
    fetched = [s for s in other_host.seen]
    assert len(fetched) >= 3  # LangChain fetch_remote, the local backend, the HTML page
    for s in fetched:
        assert "authorization" not in s.headers, s
        assert not any(n in json.dumps(s.headers) for n in NEEDLES), s
