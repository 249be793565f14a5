"""A product's rows: validated against its schema, their embedded text and the ingestion digest."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from datamesh.core.plan import CollectionPlan, point_id
from datamesh.resource.models import DataProductSpec, FieldType, SchemaField

Row = dict[str, Any]

MAX_REASONS = 5


@dataclass
class ValidatedRows:
    """Rows that passed the schema, with their point ids, and what was refused."""

    ids: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    rejected: int = 0
    reasons: list[str] = field(default_factory=list)
    ignored_columns: set[str] = field(default_factory=set)

    def reject(self, index: int, reason: str) -> None:
        self.rejected += 1
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(f"row {index + 1}: {reason}")


def _coerce(value: Any, kind: FieldType) -> Any:
    """A row value as its schema type, in a JSON-friendly form; raises ValueError."""
    if kind is FieldType.string:
        if isinstance(value, (dict, list)):
            raise ValueError("expected text, got a nested object")
        return str(value)
    if kind is FieldType.integer:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    if kind is FieldType.number:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    if kind is FieldType.boolean:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    if kind is FieldType.timestamp:
        if isinstance(value, datetime):
            return value.isoformat()
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).isoformat()
    if isinstance(value, (datetime, date)):
        return value.isoformat()[:10]
    return date.fromisoformat(str(value)).isoformat()


def validate_rows(namespace: str, name: str, spec: DataProductSpec, rows: Sequence[Row]) -> ValidatedRows:
    """Check every row against the schema; refused rows are counted with their first reasons."""
    fields: dict[str, SchemaField] = {f.name: f for f in spec.data_schema.fields}
    primary_key = spec.primary_key
    out = ValidatedRows()
    seen: dict[str, int] = {}
    for index, raw in enumerate(rows):
        clean: Row = {}
        problem = None
        for fname, fdef in fields.items():
            value = raw.get(fname)
            if value is None or value == "":
                if fdef.required or fdef.primary_key:
                    problem = f"{fname} is missing"
                    break
                continue
            try:
                clean[fname] = _coerce(value, FieldType(fdef.type))
            except (ValueError, TypeError) as exc:
                problem = f"{fname}: {exc}"
                break
        if problem is None and spec.key_fields and not key_text(clean, spec.key_fields).strip():
            # A row with no text to embed could never be found by a question.
            problem = f"no text in key fields {', '.join(spec.key_fields)}"
        if problem is None and primary_key:
            pid = point_id(namespace, name, [clean[k] for k in primary_key])
            if pid in seen:
                problem = f"duplicate primary key {[clean[k] for k in primary_key]} (first in row {seen[pid] + 1})"
        if problem is not None:
            out.reject(index, problem)
            continue
        out.ignored_columns.update(k for k in raw if k not in fields)
        seen[pid] = index
        out.ids.append(pid)
        out.rows.append(clean)
    return out


def key_text(row: Row, key_fields: Sequence[str]) -> str:
    """The text embedded for a row: its key fields, joined."""
    return "\n".join(str(row[k]) for k in key_fields if row.get(k) not in (None, ""))


def ingest_digest(plan: CollectionPlan, key_fields: Sequence[str], validated: ValidatedRows) -> str:
    """Fingerprint of what an ingestion writes: same digest, nothing to write."""
    h = hashlib.sha256()
    h.update(json.dumps([plan.index, list(key_fields)]).encode())
    for pid, row in zip(validated.ids, validated.rows, strict=True):
        h.update(pid.encode())
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]
