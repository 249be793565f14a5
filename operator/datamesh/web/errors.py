"""One error type for every HTTP app of the platform, and the two wire shapes it renders to.

The query service answers ``{"detail": ...}`` (FastAPI's shape); the inference runtime answers
OpenAI's ``{"error": {"message", "type", "param", "code"}}`` so OpenAI clients understand it.
Both raise :class:`ApiError`; only the rendering differs.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from datamesh.web.json import SafeJSONResponse


class ApiError(Exception):
    """An HTTP error answer: status, message, and what the wire shapes need."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        type: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = status, message, code, type, param
        self.headers = headers
        self.extra = extra


class DetailBody(BaseModel):
    """FastAPI's error shape."""

    detail: Any


class OpenAIErrorBody(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    """OpenAI's error answer."""

    error: OpenAIErrorBody


def detail_response(exc: ApiError) -> SafeJSONResponse:
    """``{"detail": message, ...extra}``."""
    return SafeJSONResponse({"detail": exc.message, **exc.extra}, status_code=exc.status, headers=exc.headers)


def openai_response(exc: ApiError) -> SafeJSONResponse:
    """OpenAI's ``{"error": {...}}``; a 503 says when to retry."""
    body = OpenAIErrorResponse(
        error=OpenAIErrorBody(message=exc.message, type=exc.type, param=exc.param, code=exc.code)
    )
    headers = {**({"Retry-After": "1"} if exc.status == 503 else {}), **(exc.headers or {})}
    return SafeJSONResponse(body.model_dump(), status_code=exc.status, headers=headers or None)
