"""HTTP to Clowder for extractors: kept-alive connections, bounded retries on transient faults.

pyclowder's Connector.get/post call requests.get/post, opening a new TCP connection for every
call; routing them through one Session keeps the connection alive (the largest single saving
per file), and the calls agent.keepalive_http can take exactly skip requests' own per-call
Python too (three quarters of a small call's CPU). Transient faults (connection errors,
timeouts, 5xx, 429) are retried with backoff; 4xx answers are final and raised at once, since
asking again cannot change them.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import requests
from urllib.parse import urlsplit
from requests.utils import select_proxy

from . import keepalive_http

log = logging.getLogger("agent.http")

RETRY_STATUS = {429, 500, 502, 503, 504}


class _Session(requests.Session):
    """A Session that reads proxy and CA settings from the environment once per host.

    requests scans the whole environment on every request (a fifth of the cost of a small
    request on a loopback Clowder); the environment of an agent does not change while it runs.
    """

    def __init__(self) -> None:
        super().__init__()
        self._env_cache: dict[tuple, dict[str, Any]] = {}

    def merge_environment_settings(self, url, proxies, stream, verify, cert):  # type: ignore[override]
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc, tuple(sorted((proxies or {}).items())), stream, verify, cert)
        cached = self._env_cache.get(key)
        if cached is None:
            cached = super().merge_environment_settings(url, proxies, stream, verify, cert)
            if len(self._env_cache) > 256:
                self._env_cache.clear()
            self._env_cache[key] = cached
        return dict(cached)


class ClowderHTTP:
    """A requests.Session with retries, used by the agent's pyclowder connector."""

    def __init__(self, attempts: int = 4, backoff: float = 0.5, max_backoff: float = 8.0,
                 timeout: tuple[float, float] = (10.0, 300.0),
                 sleep: Callable[[float], None] = time.sleep, keepalive: bool = True) -> None:
        self.session = _Session()
        self.keepalive = keepalive_http.KeepAliveHTTP() if keepalive else None
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self._sleep = sleep

    def request(self, method: str, url: str, raise_status: bool = True, **kwargs: Any) -> requests.Response:
        """Send a request, retrying transient failures; raise HTTPError for final error statuses."""
        kwargs.setdefault("timeout", self.timeout)
        body = kwargs.get("data")
        rewindable = body is None or isinstance(body, (bytes, str, dict, list, tuple))
        if hasattr(body, "seek") and hasattr(body, "tell"):
            start = body.tell()
            rewindable = True
        else:
            start = None
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            last = attempt == self.attempts or not rewindable
            try:
                if start is not None:
                    body.seek(start)
                response = self._send(method, url, kwargs)
            except (requests.ConnectionError, requests.Timeout) as exc:
                if last:
                    raise
                log.warning("%s %s failed (%s); retry %d/%d in %.1fs", method, _path(url),
                            exc.__class__.__name__, attempt, self.attempts - 1, delay)
            else:
                if response.status_code not in RETRY_STATUS or last:
                    if raise_status:
                        response.raise_for_status()
                    return response
                log.warning("%s %s answered %d; retry %d/%d in %.1fs", method, _path(url),
                            response.status_code, attempt, self.attempts - 1, delay)
                response.close()
            self._sleep(delay)
            delay = min(delay * 2, self.max_backoff)
        raise AssertionError("unreachable")

    def _send(self, method: str, url: str, kwargs: dict[str, Any]) -> requests.Response:
        """The call through the kept-alive client when it takes it exactly, else through requests."""
        session = self.session
        if self.keepalive is not None and keepalive_http.fits(kwargs) and not (session.cookies or session.cert
                                                                            or session.auth):
            stream = bool(kwargs.get("stream", False))
            env = session.merge_environment_settings(url, {}, stream, kwargs.get("verify"), None)
            if not select_proxy(url, env["proxies"]) and not env["cert"]:
                full, headers, body = keepalive_http.prepare(session, url, kwargs)
                response = self.keepalive.request(method, full, headers, body, kwargs["timeout"], env["verify"],
                                                  stream)
                after = keepalive_http.redirect(method, url, response, kwargs)
                if after is None:
                    return response
                response.close()
                method, url, kwargs = after
        return session.request(method, url, **kwargs)

    def close(self) -> None:
        self.session.close()
        if self.keepalive is not None:
            self.keepalive.close()


def _path(url: str) -> str:
    """The URL without its query string, which carries the Clowder key in v1."""
    return url.split("?", 1)[0]


def is_transient(exc: BaseException) -> bool:
    """True for failures of Clowder or the network, not of the file: no answer, 5xx, 429, a cut download."""
    if isinstance(exc, requests.HTTPError):
        code = exc.response.status_code if exc.response is not None else 0
        return code in RETRY_STATUS or code >= 500
    return isinstance(exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError))


def is_final_client_error(exc: BaseException) -> bool:
    """True for an HTTP 4xx that retrying will not fix (not 408 or 429)."""
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        return 400 <= code < 500 and code not in (408, 429)
    return False


__all__ = ["ClowderHTTP", "is_final_client_error"]
