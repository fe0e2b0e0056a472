"""Reading server answers without trusting them."""

from __future__ import annotations

from typing import Any

import httpx


def json_body(resp: httpx.Response) -> Any:
    """The decoded JSON body, or None when the body is not JSON (an HTML error page, say)."""
    try:
        return resp.json()
    except (ValueError, UnicodeDecodeError):
        return None
