"""Cache of LLM responses, so a re-run pays nothing for requests already answered.

One JSON object per answered request, under ``LOCATION/ab/abcdef....json`` where the
name is the sha256 of the request's canonical JSON (model, messages and sampling
parameters: exactly the body sent to the endpoint, which holds no credentials).
``LOCATION`` is a local folder or any pyarrow filesystem URI, query options included
(``s3://bucket/run/cache?endpoint_override=127.0.0.1:9000&scheme=http``). Writes are
whole or nothing (:func:`raypipe.storage.publish`): on a local disk (or another
filesystem with a rename) an entry is written to a temporary ``.tmp-*`` name and renamed
into place; on an object store (S3, GCS, Azure) the serialized entry is uploaded in one
call, aborted if it raises. Readers in other actors or processes never see half an
entry, and a killed or failing writer leaves none under the final name. Only successful
answers are stored.

Versions. ``CACHE_VERSION`` is part of every key: bump it when the same request body
should no longer find old answers (they then simply stop matching). Each entry also
records its ``format``: format 2 (this version) stores the answer's ``text``,
``prompt_tokens``, ``completion_tokens``, ``cost_usd`` (USD paid when it was asked),
``model`` and ``finish_reason``. Entries written by earlier raypipe versions (no
``format`` field, at least ``text``) keep working: they are the same layout and the
same keys, and a hit on one reports the tokens it holds (cost unknown: the backend
prices them with ``llm.prices``). An entry of a newer format than this code knows is
ignored (a miss), with one log message per cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from raypipe import storage
from raypipe.config import redact_url
from raypipe.errors import ConfigError

log = logging.getLogger(__name__)

#: Part of every key: bump when old answers must stop matching the same request.
CACHE_VERSION = 1
#: Layout of an entry's fields (see the module docstring); entries without one are format 1.
ENTRY_FORMAT = 2
#: Filesystems on which one upload is atomic (no temporary name + rename needed).
OBJECT_STORES = storage.OBJECT_STORES


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
    """Answers by request key, one entry each, safe for concurrent writers.

    Args:
        location: a local folder, or a pyarrow filesystem URI (``s3://``, ``gs://``,
            ``abfs://``, ``hdfs://``, ``file://``) with its query options.

    Raises:
        ConfigError: the URI names no filesystem pyarrow knows, or its bucket does not exist.
    """

    def __init__(self, location: str | Path) -> None:
        self.location = str(location)
        if isinstance(location, Path) or "://" not in self.location:
            self.fs: pafs.FileSystem = pafs.LocalFileSystem()
            self.root = str(Path(location))
        else:
            try:
                self.fs, self.root = storage.open_location(self.location)
            except (ValueError, OSError) as e:
                raise ConfigError(
                    f"LLM cache location {redact_url(self.location)} is not a filesystem "
                    f"pyarrow can open ({e}): give a local folder or a URI such as "
                    "s3://bucket/path, or set llm.cache=false."
                ) from None
        self.root = self.root.rstrip("/") or "/"
        #: True on the local disk: reads and writes are quick enough for an event loop.
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        self._atomic_put = self.fs.type_name in OBJECT_STORES
        self._warned_format = False
        if self.is_local:
            Path(self.root).mkdir(parents=True, exist_ok=True)
        elif self._atomic_put:
            bucket = self.root.split("/", 1)[0]
            if self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise ConfigError(
                    f"LLM cache location {self}: bucket {bucket!r} does not exist. "
                    "Create it, choose another location, or set llm.cache=false."
                )
        else:
            self.fs.create_dir(self.root, recursive=True)

    def path(self, key: str) -> str:
        return f"{self.root}/{key[:2]}/{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored entry, or None when absent (or unreadable, which is logged)."""
        path = self.path(key)
        try:
            if self.is_local:
                raw = Path(path).read_bytes()
            else:
                with self.fs.open_input_stream(path) as f:
                    raw = f.read()
            data = json.loads(raw.decode("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning(
                "ignoring unreadable cache entry %s (%s)", self._show(path), type(e).__name__
            )
            return None
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            log.warning("ignoring malformed cache entry %s", self._show(path))
            return None
        fmt = data.get("format", 1)
        if not isinstance(fmt, int) or fmt > ENTRY_FORMAT:
            if not self._warned_format:
                self._warned_format = True
                log.warning(
                    "LLM cache %s holds entries of format %r, newer than this raypipe reads "
                    "(%d): they are ignored and asked again. Upgrade raypipe to reuse them.",
                    self,
                    fmt,
                    ENTRY_FORMAT,
                )
            return None
        return data

    #: Called before every store (a generation run's lease check: raises LeaseLost once
    #: another run holds OUT, so nothing more is published into its cache).
    fence = None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        """Store ``entry`` (must hold ``text``) atomically under ``key``."""
        if self.fence is not None:
            self.fence()
        payload = json.dumps({"format": ENTRY_FORMAT, **entry}, ensure_ascii=False).encode()
        # Temporary names at the cache's top (not in its 256 sub-folders): the next run
        # removes leftovers there without listing every entry.
        storage.publish(self.fs, self.path(key), payload, tmp_folder=self.root)

    def __len__(self) -> int:
        return len(storage.list_files(self.fs, self.root, ".json"))

    def _show(self, path: str) -> str:
        return path if self.is_local else f"{self.fs.type_name}://{path}"

    def __str__(self) -> str:
        return redact_url(self.location)

    def __repr__(self) -> str:
        return f"ResponseCache({str(self)!r})"
