"""A product's rows: validated against its schema, their embedded text and the ingestion digest.

Rows arrive in batches (a large source is streamed, never held whole); a :class:`RowValidator`
keeps what must be known across batches (primary keys seen, refusals and their first reasons)
and an :class:`IngestDigest` fingerprints exactly what would be written.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from datamesh.core.plan import CollectionPlan, point_id
from datamesh.resource.models import DataProductSpec, FieldType, SchemaField

Row = dict[str, Any]

MAX_REASONS = 5
_INTEGER_TEXT = re.compile(r"^[+-]?\d+$")


@dataclass
class ValidatedBatch:
    """The rows of one batch that passed, with their point ids, in source order."""

    ids: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)


@dataclass
class Refusals:
    """What validation refused so far: how many rows, the first reasons, and columns nobody declared."""

    rows: int = 0
    reasons: list[str] = field(default_factory=list)
    ignored_columns: set[str] = field(default_factory=set)
    case_mismatches: dict[str, str] = field(default_factory=dict)  # source column -> schema field

    def add(self, index: int, reason: str) -> None:
        self.rows += 1
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(f"row {index + 1}: {reason}")

    def summary(self) -> str:
        """The refusals in a sentence: count, first reasons, and why columns did not match."""
        parts = [f"{self.rows} rows rejected" + (f" ({'; '.join(self.reasons)})" if self.reasons else "")]
        if self.case_mismatches:
            pairs = ", ".join(
                f"{src!r} is {dst!r} except for case" for src, dst in sorted(self.case_mismatches.items())
            )
            parts.append(f"column names differ from the schema only in case: {pairs}")
        return "; ".join(parts)


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
        if isinstance(value, int):
            return value  # 20000 stays 20000: a number keeps its type
        if isinstance(value, str) and _INTEGER_TEXT.match(value.strip()):
            return int(value)
        number = float(value)
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite number, got {value!r}")
        return number
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


class RowValidator:
    """Checks a product's rows against its schema, batch after batch, remembering keys seen."""

    def __init__(self, namespace: str, name: str, spec: DataProductSpec) -> None:
        self.namespace = namespace
        self.name = name
        self.fields: dict[str, SchemaField] = {f.name: f for f in spec.data_schema.fields}
        # Per field, once: looked up for every value, the enum call was a tenth of validating a row.
        self._checks = [(f.name, FieldType(f.type), f.required or f.primary_key) for f in spec.data_schema.fields]
        self._by_folded = {f.casefold(): f for f in self.fields}
        self.primary_key = spec.primary_key
        self.key_fields = spec.key_fields
        self.refusals = Refusals()
        self.seen = 0  # rows looked at, refused or not
        self.accepted = 0
        self._first: dict[str, int] = {}  # point id -> source row of its first occurrence

    def validate(self, rows: Iterable[Row]) -> ValidatedBatch:
        """The rows of this batch that pass; the others are counted with their first reasons."""
        out = ValidatedBatch()
        for raw in rows:
            index = self.seen
            self.seen += 1
            clean, problem = self._row(raw)
            if problem is not None:
                self.refusals.add(index, problem)
                continue
            pid = point_id(self.namespace, self.name, [clean[k] for k in self.primary_key])
            first = self._first.setdefault(pid, index)
            if first != index:
                key = [clean[k] for k in self.primary_key]
                self.refusals.add(index, f"duplicate primary key {key} (first in row {first + 1})")
                continue
            self._note_columns(raw)
            out.ids.append(pid)
            out.rows.append(clean)
            self.accepted += 1
        return out

    def _row(self, raw: Row) -> tuple[Row, str | None]:
        clean: Row = {}
        for fname, kind, needed in self._checks:
            value = raw.get(fname)
            if value is None or value == "":
                if needed:
                    return clean, f"{fname} is missing" + self._case_hint(raw, fname)
                continue
            try:
                clean[fname] = _coerce(value, kind)
            except (ValueError, TypeError) as exc:
                return clean, f"{fname}: {exc}"
        if self.key_fields and not key_text(clean, self.key_fields).strip():
            # A row with no text to embed could never be found by a question.
            return clean, f"no text in key fields {', '.join(self.key_fields)}"
        return clean, None

    def _case_hint(self, raw: Row, fname: str) -> str:
        for column in raw:
            if column != fname and column.casefold() == fname.casefold():
                self.refusals.case_mismatches[column] = fname
                return f" (the source has {column!r}: column names are case-sensitive)"
        return ""

    def _note_columns(self, raw: Row) -> None:
        for column in raw:
            if column not in self.fields:
                self.refusals.ignored_columns.add(column)
                match = self._by_folded.get(column.casefold())
                if match is not None:
                    self.refusals.case_mismatches[column] = match

    def too_many_refused(self, max_percent: float) -> bool:
        """Whether the refused share exceeds the policy (a source with rows, all refused, always does)."""
        if self.seen == 0:
            return False
        if self.accepted == 0:
            return True
        return self.refusals.rows * 100 > max_percent * self.seen


def key_text(row: Row, key_fields: Sequence[str]) -> str:
    """The text embedded for a row: its key fields, joined."""
    return "\n".join(str(row[k]) for k in key_fields if row.get(k) not in (None, ""))


class IngestDigest:
    """Fingerprint of what an ingestion writes: same digest, nothing to write."""

    def __init__(self, plan: CollectionPlan, key_fields: Sequence[str]) -> None:
        self._hash = hashlib.sha256(json.dumps([plan.index, list(key_fields)]).encode())

    def update(self, batch: ValidatedBatch) -> None:
        """Add a batch of validated rows, in source order."""
        for pid, row in zip(batch.ids, batch.rows, strict=True):
            self._hash.update(pid.encode())
            self._hash.update(json.dumps(row, sort_keys=True, default=str).encode())

    def hexdigest(self) -> str:
        """The fingerprint so far."""
        return self._hash.hexdigest()[:32]


def validate_rows(
    namespace: str, name: str, spec: DataProductSpec, rows: Sequence[Row]
) -> tuple[ValidatedBatch, Refusals]:
    """All rows of a small source at once: what passed, and what was refused."""
    validator = RowValidator(namespace, name, spec)
    return validator.validate(rows), validator.refusals
