"""The API key and the credentials inside ``llm.base_url``: where they come from, and
how they are kept out of every message, log line, pickle and manifest.

The key is read where it is used, in the process that sends the requests: from the
environment variable ``llm.api_key_env`` of that node, else from the file
``llm.api_key_file`` on that node. It never travels as an argument: a driver does not
hand it to Ray actors (actor arguments are stored in Ray's control store and shown
by its tools), and :class:`~raypipe.llm.base.Secret` refuses to be pickled.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from raypipe.errors import EndpointError
from raypipe.llm.base import Secret
from raypipe.llm.config import LLMConfig


def read_api_key(cfg: LLMConfig, given: Secret | None = None) -> Secret:
    """The key from ``$llm.api_key_env``, else ``llm.api_key_file``, else ``given``.

    Raises:
        EndpointError: none of them holds a key (says how to provide one).
    """
    value = os.environ.get(cfg.api_key_env, "")
    if not value and cfg.api_key_file:
        path = Path(cfg.api_key_file).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as e:
            raise EndpointError(
                f"cannot read llm.api_key_file {str(path)!r} ({type(e).__name__}): put the "
                "key in that file on every node that runs LLM requests, readable by Ray's "
                f"user, or set {cfg.api_key_env} on those nodes."
            ) from None
    if not value and given is not None:
        value = given.value
    if not value:
        raise EndpointError(
            f"the environment variable {cfg.api_key_env} (llm.api_key_env) is not set: "
            f"export {cfg.api_key_env}=<your API key> before running (on a cluster: on every "
            "node, see docs/cluster.md), or point llm.api_key_file at a file "
            "holding it. A local vLLM server started without --api-key accepts any "
            "non-empty value."
        )
    return Secret(value)


def split_base_url(url: str | None) -> tuple[str | None, dict[str, str], dict[str, str]]:
    """``(url, query parameters, headers)`` for the openai SDK from ``llm.base_url``.

    The SDK appends request paths to the base URL's text, so query parameters
    (``?api-key=...``) go as its default query. A ``user:password@`` part is sent as
    HTTP Basic auth, in place of the Bearer key, on every transport (as curl does;
    left in the URL, httpx would do the same silently and aiohttp would refuse it).
    """
    if not url or ("?" not in url and "@" not in url):
        return url, {}, {}
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    headers = {}
    if "@" in parts.netloc:
        userinfo, host = parts.netloc.rsplit("@", 1)
        user, _, password = userinfo.partition(":")
        pair = f"{unquote(user)}:{unquote(password)}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        parts = parts._replace(netloc=host)
    return urlunsplit(parts._replace(query="")), query, headers


def scrub(text: str, secrets: list[str] | tuple[str, ...]) -> str:
    """``text`` with each of ``secrets`` replaced by ``***``."""
    for value in secrets:
        if value:
            text = text.replace(value, "***")
    return text


class ScrubLogFilter(logging.Filter):
    """Replaces registered secrets in the records of the loggers it is attached to."""

    def __init__(self) -> None:
        super().__init__()
        self._counts: Counter[str] = Counter()  # secret -> backends using it
        self._secrets: tuple[str, ...] = ()  # longest first; replaced whole, never mutated
        self._lock = threading.Lock()

    def register(self, secrets: list[str], add: bool) -> None:
        with self._lock:
            for value in secrets:
                self._counts[value] += 1 if add else -1
            self._counts = +self._counts  # drop counts at zero
            self._secrets = tuple(sorted(self._counts, key=len, reverse=True))

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = self._secrets
        if secrets:
            message = clean = record.getMessage()
            for value in secrets:
                clean = clean.replace(value, "***")
            if clean != message:
                record.msg, record.args = clean, None
        return True


#: The HTTP libraries' loggers whose lines can quote a request URL.
URL_LOGGERS = ("httpx", "httpx2", "httpcore", "openai", "openai._base_client")
log_scrub = ScrubLogFilter()
for _name in URL_LOGGERS:
    logging.getLogger(_name).addFilter(log_scrub)
