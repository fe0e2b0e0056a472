"""The contract every backend fulfils, and their default models. A backend knows nothing of
LangChain or LlamaIndex."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, ClassVar

from ..errors import InvalidRequestError
from ..types import Chunk, Request, Response, Update

OnUpdate = Callable[[Update], None]
"""Called with each progress report (fal queue position, logs). Must not block."""

# The models each backend runs when none is named (here, below every backend module, so that
# none of them imports the package that imports it)
DEFAULT_FAL_ENDPOINT = "fal-ai/mantis-llava-7b-v11"
DEFAULT_LOCAL_MODEL = "TIGER-Lab/Mantis-llava-7b"
DEFAULT_OPENAI_MODEL = ""  # "not given": the server's only served model, read from /v1/models


def require_request(backend: Backend, request: Any) -> Request:
    """The one check every backend entry point makes before touching ``request``."""
    if not isinstance(request, Request):
        raise InvalidRequestError(
            f"{type(backend).__name__} expects a mantis_llm.types.Request, not {type(request).__name__} "
            "(build one with Request(Conversation.from_prompt(text, images)))"
        )
    return request


class Backend(ABC):
    """Runs Mantis requests. Subclasses implement ``generate``/``agenerate`` and, where
    they can, real token streaming and batching; the defaults here are correct but plain."""

    provider: ClassVar[str]  # LangSmith provider name: "fal" | "transformers"
    model: str  # the fal endpoint id or the local model id/path

    @abstractmethod
    def generate(self, request: Request, *, on_update: OnUpdate | None = None) -> Response:
        """Run one request to completion."""

    @abstractmethod
    async def agenerate(self, request: Request, *, on_update: OnUpdate | None = None) -> Response:
        """Run one request without blocking the event loop."""

    def stream(self, request: Request, *, on_update: OnUpdate | None = None) -> Iterator[Chunk]:
        """Yield text pieces; the last chunk carries the whole :class:`Response`."""
        response = self.generate(request, on_update=on_update)
        yield Chunk(text=response.text, response=response)

    async def astream(self, request: Request, *, on_update: OnUpdate | None = None) -> AsyncIterator[Chunk]:
        """Async twin of :meth:`stream`."""
        response = await self.agenerate(request, on_update=on_update)
        yield Chunk(text=response.text, response=response)

    def generate_batch(self, requests: Sequence[Request]) -> list[Response]:
        """Run several requests; backends that can batch or overlap them override this."""
        return [self.generate(r) for r in requests]

    async def agenerate_batch(self, requests: Sequence[Request]) -> list[Response]:
        """Run several requests concurrently."""
        return list(await asyncio.gather(*(self.agenerate(r) for r in requests)))

    def close(self) -> None:  # noqa: B027 - an optional hook: a backend holding nothing needs no close
        """Release connections / model memory. Safe to call twice."""

    async def aclose(self) -> None:
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
