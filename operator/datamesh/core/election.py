"""Leader election over a lease: the decisions, as plain functions of what was seen and when.

Reading and writing the lease (a coordination.k8s.io Lease) is an adapter's job; renewing it
and running the operator while leading is the controller's. Times here are monotonic seconds
of this process, never another machine's clock: as in client-go, a lease counts as expired
once its record has not changed for its duration since this process first saw that record.
The leader counts its own deadline from the moment it *sent* its last successful renewal, which
is never later than when any standby saw it, so it gives up before anyone may take over.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from enum import Enum
from typing import Protocol

from datamesh.core.backoff import backoff_delay

# Seconds before the lease's expiry (on a standby's clock) by which a deposed leader must be gone
# (a tenth of short leases); covers clocks that run at slightly different rates, and the time a
# write takes to land.
EXPIRY_MARGIN_SECONDS = 1.0


class LeaseConflict(Exception):
    """Someone else wrote the lease since it was read (its version moved on, or it already exists)."""


@dataclass(frozen=True)
class LeaseRecord:
    """What a lease says: who holds it, for how long, and the version it was read at."""

    holder: str | None
    duration_seconds: int
    acquired_at: datetime | None = None
    renewed_at: datetime | None = None
    transitions: int = 0
    version: str | None = None  # resourceVersion: a write based on an older one is refused


class LeasePort(Protocol):
    """Read, create and replace (with optimistic concurrency) one named lease."""

    async def read(self) -> LeaseRecord | None:
        """The lease, or None when it does not exist."""
        ...

    async def create(self, record: LeaseRecord) -> LeaseRecord:
        """Create the lease; LeaseConflict when it already exists."""
        ...

    async def replace(self, record: LeaseRecord) -> LeaseRecord:
        """Write the lease over ``record.version``; LeaseConflict when that is no longer current."""
        ...


@dataclass(frozen=True)
class ElectionTiming:
    """How long a lease lasts, how long its leader may go without renewing it, and how often to try."""

    lease_seconds: float = 10.0
    renew_deadline_seconds: float = 7.0
    retry_seconds: float = 2.0

    def __post_init__(self) -> None:
        if not self.lease_seconds > self.renew_deadline_seconds >= 2 * self.retry_seconds > 0:
            raise ValueError(
                "leader election needs lease > renew deadline >= 2 x retry period > 0, got "
                f"{self.lease_seconds}/{self.renew_deadline_seconds}/{self.retry_seconds}"
            )


@dataclass(frozen=True)
class Observation:
    """A lease record and the (monotonic) time this process first saw it."""

    record: LeaseRecord | None
    since: float


class Action(Enum):
    """What a process that does not lead yet should do about the lease it just read."""

    WAIT = "wait"  # someone else holds a live lease
    CREATE = "create"  # there is no lease yet
    TAKE_OVER = "take-over"  # the lease expired or was released
    RENEW = "renew"  # the lease already names us (a write whose answer we lost)


def observe(previous: Observation | None, record: LeaseRecord | None, now: float) -> Observation:
    """The observation after reading ``record`` at ``now``: its time stays while the record is unchanged."""
    if previous is not None and _same(previous.record, record):
        return previous
    return Observation(record, now)


def _same(a: LeaseRecord | None, b: LeaseRecord | None) -> bool:
    # Every write moves the version, so an unchanged version is an unchanged record.
    if a is None or b is None:
        return a is b
    return (a.version, a.holder, a.renewed_at) == (b.version, b.holder, b.renewed_at)


def expired(observation: Observation, now: float) -> bool:
    """Whether the observed lease is free: missing, released, or not renewed for its duration."""
    record = observation.record
    if record is None or not record.holder:
        return True
    return now - observation.since >= record.duration_seconds


def expires_in(observation: Observation, now: float) -> float:
    """Seconds until the observed lease expires (0 when it is free already)."""
    record = observation.record
    if record is None or not record.holder:
        return 0.0
    return max(0.0, observation.since + record.duration_seconds - now)


def decide(identity: str, observation: Observation, now: float) -> Action:
    """What ``identity`` should do about the lease it observed, at ``now``."""
    record = observation.record
    if record is None:
        return Action.CREATE
    if record.holder == identity:
        return Action.RENEW
    if expired(observation, now):
        return Action.TAKE_OVER
    return Action.WAIT


def claimed(record: LeaseRecord | None, identity: str, now: datetime, timing: ElectionTiming) -> LeaseRecord:
    """The record that makes ``identity`` the holder from ``now`` (a renewal keeps its acquire time)."""
    if record is None:
        return LeaseRecord(identity, math.ceil(timing.lease_seconds), now, now, 0, None)
    ours = record.holder == identity
    return replace(
        record,
        holder=identity,
        duration_seconds=math.ceil(timing.lease_seconds),
        acquired_at=record.acquired_at if ours and record.acquired_at else now,
        renewed_at=now,
        transitions=record.transitions + (0 if ours else 1),
    )


def released(record: LeaseRecord, now: datetime) -> LeaseRecord:
    """The record a leader leaves when it stops: no holder, so a standby takes over at its next look."""
    return replace(record, holder=None, duration_seconds=1, acquired_at=now, renewed_at=now)


def renew_deadline(renewed_at: float, timing: ElectionTiming) -> float:
    """When a leader whose last renewal was sent at ``renewed_at`` must give up leading."""
    return renewed_at + timing.renew_deadline_seconds


def write_deadline(renewed_at: float, timing: ElectionTiming) -> float:
    """The last moment a deposed leader may still write: a margin before any standby can see the lease expire."""
    return renewed_at + timing.lease_seconds - min(EXPIRY_MARGIN_SECONDS, timing.lease_seconds / 10)


def standby_delay(observation: Observation, now: float, timing: ElectionTiming, rand: Callable[[], float]) -> float:
    """Seconds until a standby looks at the lease again: the retry period, a little jittered, or at its expiry."""
    # Jitter keeps several standbys from writing together; looking again right at the expiry
    # (rather than up to a period later) keeps the takeover time close to the lease duration.
    delay = timing.retry_seconds * (1 + 0.25 * rand())
    until_expiry = expires_in(observation, now)
    return min(delay, until_expiry + 0.05) if until_expiry > 0 else delay


def failure_delay(failures: int, timing: ElectionTiming) -> float:
    """Seconds before trying again after ``failures`` failed calls in a row: backoff capped at 4 retry periods."""
    return backoff_delay(failures, timing.retry_seconds, 4 * timing.retry_seconds)
