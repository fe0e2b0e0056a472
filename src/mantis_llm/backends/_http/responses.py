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


def format_detail(detail: Any) -> str:
    """A FastAPI/pydantic ``detail`` (fal's, transformers serve's): a string, or
    ``[{loc, msg, type}]`` -> ``"loc: msg; ..."`` (the ``body`` prefix of ``loc`` dropped)."""
    if isinstance(detail, list):
        lines = []
        for item in detail:
            if isinstance(item, dict):
                loc = [str(p) for p in item.get("loc", []) if p != "body"]
                msg = str(item.get("msg", item))
                lines.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
            else:
                lines.append(str(item))
        return "; ".join(lines)
    return "" if detail is None else str(detail)
