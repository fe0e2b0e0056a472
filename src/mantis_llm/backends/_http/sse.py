"""An incremental server-sent-events decoder (fal's status and token streams, OpenAI streams)."""

from __future__ import annotations


class SSEDecoder:
    """``feed(bytes) -> [data, ...]``: the data of every event completed by this chunk.

    Comments (keep-alive pings) and fields other than ``data`` are skipped; a multi-line
    ``data`` is joined with newlines; CRLF line ends are accepted.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        events = []
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif line.startswith(":"):
                continue  # comment / keep-alive ping
            else:
                name, _, value = line.partition(":")
                if name == "data":
                    self._data.append(value[1:] if value.startswith(" ") else value)
        return events

    def flush(self) -> list[str]:
        """At the end of the body: the last event, when the server did not end it with a blank line."""
        events = self.feed(b"\n\n") if self._buf or self._data else []
        return events
