"""Outbound HTTP with retries: capped exponential backoff with full jitter, honouring Retry-After.

Connection errors, timeouts and the ``retry_statuses`` (429 and 5xx) are retried; any other
answer, a 4xx included, is the caller's to judge. After the last attempt, RetriesExhausted
names the URL and the last cause.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeVar

import httpx

from datamesh.core.backoff import backoff_delay

T = TypeVar("T")

RETRY_STATUSES: frozenset[int] = frozenset({429, *range(500, 600)})

_TIMEOUT_KINDS: dict[type[httpx.TimeoutException], str] = {
    httpx.ConnectTimeout: "connect",
    httpx.ReadTimeout: "read",
    httpx.WriteTimeout: "write",
    httpx.PoolTimeout: "pool",
}


class RetriesExhausted(Exception):
    """Every attempt at a request failed in a retryable way; ``cause`` says how the last one did."""

    def __init__(
        self, method: str, url: str, attempts: int, cause: str, response: httpx.Response | None = None
    ) -> None:
        super().__init__(f"{method} {url} failed after {attempts} attempts: {cause}")
        self.method, self.url, self.attempts, self.cause, self.response = method, url, attempts, cause, response


class RetryableResponse(Exception):
    """Raised by an attempt whose answer is worth retrying (e.g. a 503), so :func:`with_retries` retries it."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


def server_message(response: httpx.Response, limit: int = 500) -> str:
    """The error text a server put in its response (OpenAI, FastAPI or plain-text shape), cut at ``limit``."""
    try:
        body = response.json()
    except httpx.ResponseNotRead:  # a streamed response whose body was never read
        return response.reason_phrase
    except ValueError:
        return response.text.strip()[:limit] or response.reason_phrase
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:limit]
        for key in ("error", "detail", "message"):
            if body.get(key):
                return str(body[key])[:limit]
    return str(body)[:limit]


def describe_error(exc: httpx.TransportError) -> str:
    """A connection error or timeout in a few words, e.g. ``timed out after 5s (ConnectTimeout)``."""
    name = type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        try:
            seconds = exc.request.extensions["timeout"][_TIMEOUT_KINDS[type(exc)]]
        except (RuntimeError, KeyError, TypeError):  # no request attached, or no such timeout
            seconds = None
        return f"timed out after {seconds:g}s ({name})" if seconds else f"timed out ({name})"
    return f"{name}: {exc}" if str(exc) else name


def retry_after(response: httpx.Response, cap: float) -> float:
    """A server's Retry-After in seconds (capped), or 0 when it gives none in that form."""
    try:
        return min(cap, max(0.0, float(response.headers.get("retry-after", ""))))
    except ValueError:
        return 0.0


async def with_retries(
    attempt: Callable[[], Awaitable[T]],
    *,
    method: str,
    url: str,
    attempts: int,
    backoff_base: float,
    backoff_max: float,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """``await attempt()`` until it returns, retrying httpx transport errors and RetryableResponse with backoff.

    The pause before a retry is :func:`backoff_delay`, or the server's Retry-After when longer
    (both capped at ``backoff_max``); ``on_retry`` is called before each. Any other exception
    ends the attempts at once. After the last attempt: RetriesExhausted.
    """
    attempts = max(1, attempts)
    for number in range(1, attempts + 1):
        try:
            return await attempt()
        except httpx.TransportError as exc:
            failure: Exception = exc
            cause, response, at_least = describe_error(exc), None, 0.0
        except RetryableResponse as exc:
            failure, response = exc, exc.response
            cause = f"HTTP {response.status_code}: {server_message(response)}"
            at_least = retry_after(response, backoff_max)
        if number == attempts:
            raise RetriesExhausted(method, url, attempts, cause, response) from failure
        if on_retry is not None:
            on_retry()
        await asyncio.sleep(max(at_least, backoff_delay(number, backoff_base, backoff_max)))
    raise AssertionError("unreachable")


async def request_with_retries(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    attempts: int,
    backoff_base: float,
    backoff_max: float,
    retry_statuses: Collection[int] = RETRY_STATUSES,
    semaphore: asyncio.Semaphore | None = None,
    on_retry: Callable[[], None] | None = None,
    **kwargs: Any,
) -> httpx.Response:
    """``client.request(method, url, **kwargs)`` with :func:`with_retries`; the first answer not in ``retry_statuses``.

    ``semaphore``, when given, is held for each attempt's request only, not during the pauses.
    """

    async def attempt() -> httpx.Response:
        async with semaphore if semaphore is not None else contextlib.nullcontext():
            response = await client.request(method, url, **kwargs)
        if response.status_code in retry_statuses:
            raise RetryableResponse(response)
        return response

    return await with_retries(
        attempt,
        method=method,
        url=url,
        attempts=attempts,
        backoff_base=backoff_base,
        backoff_max=backoff_max,
        on_retry=on_retry,
    )


def api_url(base: str, path: str) -> str:
    """``{base}/v1/{path}`` for an OpenAI-style base URL given with or without a trailing ``/v1``."""
    base = base.strip().rstrip("/").removesuffix("/v1")
    return f"{base}/v1/{path}"


class EndpointProbe:
    """Checks that a URL answers HTTP (any status below 500), with a timeout."""

    def __init__(self, client: httpx.AsyncClient, timeout: float) -> None:
        self.client = client
        self.timeout = timeout

    async def __call__(self, url: str) -> str | None:
        """None when ``url`` answers, else the cause."""
        try:
            response = await self.client.get(url, timeout=self.timeout)
        except httpx.HTTPError as exc:
            return f"{url} is unreachable: {exc.__class__.__name__}: {exc}".rstrip(": ")
        if response.status_code >= 500:
            return f"{url} answered HTTP {response.status_code}"
        return None
