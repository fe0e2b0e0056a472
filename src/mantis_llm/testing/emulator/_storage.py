"""fal storage, emulated: CDN tokens, uploads and the files they serve."""

from __future__ import annotations

import re
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any


class Storage:
    """Issued CDN tokens and uploaded files (guarded by the emulator's lock)."""

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self.tokens: dict[str, float] = {}  # token -> expiry (time.time())
        self.files: dict[str, tuple[str, bytes]] = {}  # file id -> (content type, bytes)

    def new_token(self, cdn_url: str) -> dict[str, Any]:
        """The body of ``/storage/auth/token``: a bearer token valid for an hour."""
        token = uuid.uuid4().hex
        expires = datetime.now(timezone.utc) + timedelta(hours=1)
        with self._lock:
            self.tokens[token] = time.time() + 3600
        return {"token": token, "token_type": "Bearer", "base_url": cdn_url, "expires_at": expires.isoformat()}

    def upload(self, headers: dict[str, str], raw: bytes, cdn_url: str) -> tuple[int, dict[str, Any]]:
        """(status, body) of ``/files/upload``: 401 without a live bearer token."""
        scheme, _, token = headers.get("authorization", "").partition(" ")
        with self._lock:
            ok = scheme.lower() == "bearer" and self.tokens.get(token.strip(), 0) > time.time()
        if not ok:
            return 401, {"detail": "Invalid or missing CDN token"}
        name = re.sub(r"[^\w.-]", "_", headers.get("x-fal-file-name", "") or "upload.bin")
        fid = f"{uuid.uuid4().hex[:16]}/{name}"
        with self._lock:
            self.files[fid] = (headers.get("content-type", "application/octet-stream"), raw)
        return 200, {"access_url": f"{cdn_url}/files/{fid}"}

    def get(self, fid: str) -> tuple[str, bytes] | None:
        with self._lock:
            return self.files.get(fid)

    def data(self, fid: str) -> bytes | None:
        found = self.get(fid)
        return None if found is None else found[1]
