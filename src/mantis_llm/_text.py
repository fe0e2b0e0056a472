"""Client-side stop sequences over text that arrives in pieces, shared by every backend.

fal applies no stop sequences and the local backend decodes tokens into text a step at a
time: both cut the answer here, the same way, and stream only what can no longer turn out
to be the start of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopTrimmer:
    """Cuts streamed text at the first complete stop string, holding back any tail that
    could still be the start of one.

    ``feed(delta)`` returns the text now safe to release; once a stop string is complete,
    ``stopped`` is True and ``text`` is the answer cut before it. ``flush()`` releases what
    was held back when the stream ends without a stop.
    """

    def __init__(self, stop: Sequence[str] | None) -> None:
        self.stop = tuple(stop or ())
        self.text = ""  # everything received (cut at the stop string once stopped)
        self.sent = 0  # characters already released
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add ``delta``; return the text that is now safe to release."""
        if self.stopped:
            return ""
        self.text += delta
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.text = True, self.text[:cut]
            out, self.sent = self.text[self.sent :], cut
            return out
        hold = 0
        for s in self.stop:  # longest suffix of text that is a proper prefix of s
            for n in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:n]):
                    hold = n
                    break
        end = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent : end], end
        return out

    def flush(self) -> str:
        """At the end of the stream: release what was held back."""
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


def apply_stop(text: str, stop: Sequence[str] | None) -> tuple[str, bool]:
    """``text`` cut at the first stop sequence, and whether one was found."""
    trimmer = StopTrimmer(stop)
    trimmer.feed(text)
    return trimmer.text, trimmer.stopped
