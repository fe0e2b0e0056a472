"""Streaming with tools: pass prose through as it comes, hold back what may be a call.

One :class:`StreamDetector` serves both stream drivers. It runs the parser's own scan
(:func:`mantis_llm.tools._parse.scan`) over the growing text, so the text it releases is
always a prefix of the prose the final parse finds; the final chunk carries the rest.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from ..types import Chunk, Response
from ._parse import json_start, prose_end, scan
from ._spec import Catalog

Mode = Literal["pass", "detect", "hold"]


def stream_mode(catalog: Catalog) -> Mode:
    """``pass``: no call or JSON answer is possible (choice "none", no response format);
    ``hold``: the whole answer is JSON (a forced choice, a response format), nothing is
    released before the end; ``detect``: choice "auto", prose streams until a call may start."""
    if catalog.forced or catalog.fmt is not None:
        return "hold"
    return "detect" if catalog.callable_names else "pass"


class StreamDetector:
    """Feed it the streamed text; it says what may be shown now.

    >>> d = StreamDetector(catalog)
    >>> d.feed("Sure! ")          # "Sure!" (the space is held: it may precede a call)
    >>> d.feed('{"name": "f", ')  # "" (a call may have started: held from here)
    >>> d.finish(response)       # the last Chunk: the rest of the prose + the Response

    In ``detect`` mode text is held from the first JSON start (``{"``, ``[{``) and from a
    possible opener (a fence, ``<tool_call>``, trailing whitespace); a value that closes and
    is not a call (``{this}``, a JSON example) is released and detection goes on after it.
    Once a call is seen everything else is held.
    """

    def __init__(self, catalog: Catalog, mode: Mode | None = None) -> None:
        self.catalog = catalog
        self.mode: Mode = mode or stream_mode(catalog)
        self.text = ""
        self.released = 0  # text[:released] has been handed out
        self._pos = 0  # where the scan resumes (everything before is decided prose)
        self._call = False
        self._waiting = False  # stopped at an unclosed value: rescan once a closer arrives

    @property
    def released_text(self) -> str:
        return self.text[: self.released]

    def feed(self, delta: str) -> str:
        """Add ``delta``; returns the text that can be shown now (maybe "")."""
        if not delta:
            return ""
        self.text += delta
        if self.mode == "pass":
            self.released = len(self.text)
            return delta
        if self.mode == "hold" or self._call:
            return ""
        if self._waiting and not any(c in delta for c in "}]"):
            return ""
        found = scan(self.text, self.catalog, self._pos, final=False)
        # an unclosed value can only close with a closing bracket: skip rescans until one comes
        self._waiting = found.pending and json_start(self.text, found.start) is True
        if found.calls is not None:
            self._call = True
            upto = prose_end(self.text, found.start)
        else:
            self._pos = found.safe
            upto = prose_end(self.text, found.safe, partial=True)
        return self._release(upto)

    def _release(self, upto: int) -> str:
        if upto <= self.released:
            return ""
        out = self.text[self.released : upto]
        self.released = upto
        return out

    def finish(self, response: Response) -> Chunk:
        """The last chunk: whatever of ``response.text`` (the parsed final answer) was not
        released yet, and the response, whose ``text`` is everything the stream showed.

        When a repair replaced the answer, text released earlier cannot be taken back; the
        repaired prose is added after it."""
        shown = self.released_text
        final = response.text
        tail = final[len(shown) :] if final.startswith(shown) else ("\n" if shown and final else "") + final
        return Chunk(text=tail, response=replace(response, text=shown + tail))
