"""On-disk cache of LLM responses, so a re-run pays nothing for requests already answered.

One JSON file per answered request, under ``root/ab/abcdef....json`` where the name
is the sha256 of the request's canonical JSON (model, messages and sampling
parameters: exactly the body sent to the endpoint, which holds no credentials).
Files are written to a temporary name and renamed into place, so readers in other
actors or processes never see half a file, and a killed writer leaves none.
Only successful answers are stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Bump when the meaning of a cached entry changes; old entries then stop matching.
CACHE_VERSION = 1


def request_key(body: dict[str, Any]) -> str:
    """sha256 hex digest of a request body's canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(
        {"v": CACHE_VERSION, "request": body},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


class ResponseCache:
    """Answers by request key, one file each, safe for concurrent writers."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored entry, or None when absent (or unreadable, which is logged)."""
        path = self.path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable cache entry %s (%s)", path, type(e).__name__)
            return None
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            log.warning("ignoring malformed cache entry %s", path)
            return None
        return data

    def put(self, key: str, entry: dict[str, Any]) -> None:
        """Store ``entry`` (must hold ``text``) atomically under ``key``."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(
            f".{path.name}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex}"
        )
        try:
            tmp.write_text(json.dumps(entry, ensure_ascii=False), encoding="utf-8")
            os.replace(tmp, path)
        finally:
            if tmp.exists():  # only when the write or rename failed
                tmp.unlink(missing_ok=True)

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("??/*.json"))

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.root)!r})"
