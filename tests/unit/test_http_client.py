"""The HTTP client helpers: retries with backoff, Retry-After, servers' error messages (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from datamesh.adapters.http import RetriesExhausted, describe_error, request_with_retries, server_message
from datamesh.core.backoff import backoff_delay

URL = "http://upstream.test/v1/things"
FAST: dict[str, Any] = {"attempts": 3, "backoff_base": 0.01, "backoff_max": 0.05}


def client(answers: list[httpx.Response | Exception]) -> tuple[httpx.AsyncClient, list[httpx.Request]]:
    """A client whose transport gives ``answers`` in turn (an exception is raised), recording the requests."""
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers[min(len(seen), len(answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.AsyncClient(transport=httpx.MockTransport(handle)), seen


async def test_retryable_answers_are_retried_until_one_is_not() -> None:
    retried: list[int] = []
    http, seen = client([httpx.Response(503), httpx.Response(429), httpx.Response(200, json={"ok": True})])
    async with http:
        response = await request_with_retries(
            http, "POST", URL, json={"x": 1}, on_retry=lambda: retried.append(1), **FAST
        )
    assert response.json() == {"ok": True}
    assert len(seen) == 3 and len(retried) == 2
    assert all(r.content == b'{"x":1}' for r in seen)


async def test_other_answers_are_the_callers_to_judge() -> None:
    http, seen = client([httpx.Response(404, json={"detail": "no such thing"})])
    async with http:
        response = await request_with_retries(http, "GET", URL, **FAST)
    assert response.status_code == 404 and len(seen) == 1


async def test_the_last_cause_and_the_url_are_named_after_the_last_attempt() -> None:
    http, seen = client([httpx.Response(503, json={"error": {"message": "warming up"}})])
    async with http:
        with pytest.raises(RetriesExhausted) as info:
            await request_with_retries(http, "POST", URL, **FAST)
    assert len(seen) == 3
    assert str(info.value) == f"POST {URL} failed after 3 attempts: HTTP 503: warming up"
    assert info.value.attempts == 3 and info.value.response is not None

    http, seen = client([httpx.ConnectError("refused")])
    async with http:
        with pytest.raises(RetriesExhausted, match="ConnectError: refused") as info:
            await request_with_retries(http, "GET", URL, **FAST)
    assert len(seen) == 3 and isinstance(info.value.__cause__, httpx.ConnectError)


async def test_retry_statuses_can_be_narrowed() -> None:
    http, seen = client([httpx.Response(500)])
    async with http:
        response = await request_with_retries(http, "GET", URL, retry_statuses={503}, **FAST)
    assert response.status_code == 500 and len(seen) == 1


async def test_retry_after_is_honoured_up_to_the_cap() -> None:
    http, _ = client([httpx.Response(429, headers={"Retry-After": "0.3"}), httpx.Response(200)])
    started = time.monotonic()
    async with http:
        await request_with_retries(http, "GET", URL, attempts=2, backoff_base=0.01, backoff_max=1.0)
    assert 0.3 <= time.monotonic() - started < 1.0

    http, _ = client([httpx.Response(429, headers={"Retry-After": "3600"}), httpx.Response(200)])
    started = time.monotonic()
    async with http:
        await request_with_retries(http, "GET", URL, attempts=2, backoff_base=0.01, backoff_max=0.2)
    assert time.monotonic() - started < 1.0


async def test_the_semaphore_bounds_requests_but_not_pauses() -> None:
    in_flight = peak = 0

    async def handle(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return httpx.Response(200)

    semaphore = asyncio.Semaphore(2)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as http:
        await asyncio.gather(*(request_with_retries(http, "GET", URL, semaphore=semaphore, **FAST) for _ in range(6)))
    assert peak == 2


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            lambda: httpx.Response(500, json={"error": {"message": "model overloaded", "type": "server_error"}}),
            "model overloaded",
        ),
        (lambda: httpx.Response(422, json={"detail": "unknown task"}), "unknown task"),
        (lambda: httpx.Response(400, json={"error": "bad input"}), "bad input"),
        (lambda: httpx.Response(502, text="  upstream down \n"), "upstream down"),
        (lambda: httpx.Response(503, text=""), "Service Unavailable"),
        (lambda: httpx.Response(500, json=[1, 2]), "[1, 2]"),
    ],
)
def test_server_message_shapes(make: Callable[[], httpx.Response], expected: str) -> None:
    assert server_message(make()) == expected


def test_server_message_limit_and_unread_stream() -> None:
    assert server_message(httpx.Response(500, text="x" * 1000), limit=300) == "x" * 300
    streamed = httpx.Response(503, stream=httpx.ByteStream(b'{"detail": "not read"}'))
    assert server_message(streamed) == "Service Unavailable"


def test_describe_error_and_backoff() -> None:
    request = httpx.Request(
        "GET", URL, extensions={"timeout": {"connect": 5.0, "read": 0.5, "write": 0.5, "pool": 0.5}}
    )
    assert describe_error(httpx.ReadTimeout("", request=request)) == "timed out after 0.5s (ReadTimeout)"
    assert describe_error(httpx.ConnectTimeout("")) == "timed out (ConnectTimeout)"
    assert (
        describe_error(httpx.ConnectError("All connection attempts failed"))
        == "ConnectError: All connection attempts failed"
    )
    assert describe_error(httpx.RemoteProtocolError("")) == "RemoteProtocolError"
    for retry, (low, high) in enumerate([(0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (2.5, 5.0), (2.5, 5.0)], start=1):
        assert all(low <= backoff_delay(retry, 1.0, 5.0) <= high for _ in range(50))
