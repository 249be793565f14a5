"""A JSON response that always encodes."""

from __future__ import annotations

import json
import math
from typing import Any

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
    """JSON that always encodes: ASCII escapes (lone surrogates survive), non-finite numbers as null."""

    def render(self, content: Any) -> bytes:
        try:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()
        except ValueError:
            return json.dumps(finite(content), ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()
