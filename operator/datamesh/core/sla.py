"""Service levels and refresh timing: pure functions of a spec, a status and the time."""

from __future__ import annotations

import hashlib
from datetime import datetime

from datamesh.core.conditions import Check, ConditionType
from datamesh.resource.models import DataProductSpec, SLAStatus, parse_duration


def freshness_check(spec: DataProductSpec, last_ingested_at: datetime | None, now: datetime) -> tuple[bool | None, str]:
    """Whether the newest ingestion is within ``sla.freshness``."""
    if spec.sla is None or spec.sla.freshness is None or spec.source is None:
        return None, "no freshness objective"
    if last_ingested_at is None:
        return False, "never ingested"
    age = (now - last_ingested_at).total_seconds()
    limit = parse_duration(spec.sla.freshness)
    if age > limit:
        return False, f"last ingestion is {age:.0f}s old, over the {spec.sla.freshness} freshness objective"
    return True, f"last ingestion is {age:.0f}s old (objective {spec.sla.freshness})"


def refresh_due(spec: DataProductSpec, last_ingested_at: datetime | None, now: datetime) -> bool:
    """Whether ``source.refreshInterval`` has passed since the last ingestion."""
    if spec.source is None or spec.source.refresh_interval is None or last_ingested_at is None:
        return False
    return (now - last_ingested_at).total_seconds() >= parse_duration(spec.source.refresh_interval)


def next_check_in(spec: DataProductSpec, last_ingested_at: datetime | None, now: datetime, period: float) -> float:
    """Seconds until a product's next periodic check: the check period, or sooner when a refresh comes due.

    A refresh that did not happen when due (its source failed) is tried again one refresh interval
    later, not in a tight loop.
    """
    if spec.source is None or spec.source.refresh_interval is None:
        return period
    interval = parse_duration(spec.source.refresh_interval)
    if last_ingested_at is None:
        # Not ingested yet (a new product: its change handler is ingesting now): look again one
        # interval on, so the first refresh is not left to the restart spread of the first check.
        return max(1.0, min(period, interval))
    due = interval - (now - last_ingested_at).total_seconds()
    return max(1.0, min(period, due if due > 0 else interval))


def first_check_in(uid: str, period: float, reconciled: bool = True) -> float:
    """When a product's periodic checks start: a stable point of the first half period, spread by uid.

    After a restart every product is checked once within half a period, not all at the same moment.
    A product never reconciled yet (new: its change handler is reconciling it now) waits one period.
    """
    if not reconciled:
        # Checked sooner, it would only repeat what its first reconcile has just done.
        return period
    return period / 2 * int(hashlib.sha256(uid.encode()).hexdigest()[:8], 16) / 2**32


def sla_check(
    spec: DataProductSpec, last_ingested_at: datetime | None, inference: Check, now: datetime
) -> tuple[Check, SLAStatus]:
    """The SLAMet condition and the SLA status, from freshness and the inference endpoint's check."""
    fresh, fresh_msg = freshness_check(spec, last_ingested_at, now)
    wants_availability = (
        spec.sla is not None
        and spec.sla.availability is not None
        and spec.inference is not None
        and spec.inference.enabled
    )
    available = bool(inference.ok) if wants_availability else None
    objectives = ((fresh, fresh_msg), (available, f"inference endpoint not available: {inference.message}"))
    breaches = [message for ok, message in objectives if ok is False]
    met = None if fresh is None and available is None else not breaches
    status = SLAStatus(
        met=met,
        freshness_met=fresh,
        availability_met=available,
        last_checked_at=now,
        message="; ".join(breaches) or None,
    )
    if met is None:
        return Check(ConditionType.sla_met, True, "NoObjectives", "no checkable SLA objectives"), status
    if met:
        return Check(ConditionType.sla_met, True, "SLAMet", fresh_msg if fresh else "objectives met"), status
    return Check(ConditionType.sla_met, False, "SLABreached", "; ".join(breaches)), status
