"""HTTP plumbing shared by the HTTP backends (fal, OpenAI-compatible servers), sans-I/O.

A backend writes its protocol as *flows*: generators that yield :mod:`.actions` and get
their outcome back. :mod:`.drivers` runs a flow once with an :class:`httpx.Client` and once
with an :class:`httpx.AsyncClient`, so sync and async cannot drift apart; :mod:`.retry`
holds the one retry loop (backoff, ``Retry-After``, the whole-call deadline) and :mod:`.sse`
the server-sent-events decoder.
"""
