"""A JSON response that always encodes."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
from fastapi.responses import JSONResponse


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by null (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


class SafeJSONResponse(JSONResponse):
    """JSON that always encodes: UTF-8, non-finite numbers as null, a lone surrogate as an ASCII escape."""

    def render(self, content: Any) -> bytes:
        try:
            # orjson writes non-finite numbers as null itself, and a query answer about 15x faster.
            return orjson.dumps(content)
        except TypeError:  # a lone surrogate (not UTF-8), an int over 64 bits, a type orjson does not know
            return json.dumps(finite(content), ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()
