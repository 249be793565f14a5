"""Status conditions in the CloudNativePG / kstatus style.

``lastTransitionTime`` moves only when a condition's status changes, so a human (and Argo CD,
and Flux's kstatus) can tell how long a product has been in its state.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

from datamesh.resource.models import Condition, ConditionStatus, DataProductStatus, Phase


class ConditionType(str, Enum):
    collection_ready = "CollectionReady"
    ingested = "Ingested"
    inference_ready = "InferenceReady"
    cataloged = "Cataloged"
    sla_met = "SLAMet"
    ready = "Ready"


# Conditions that must be True for the product to be Ready; SLAMet is reported, not gating.
GATING = (
    ConditionType.collection_ready,
    ConditionType.ingested,
    ConditionType.inference_ready,
    ConditionType.cataloged,
)


@dataclass(frozen=True)
class Check:
    """The outcome of one reconcile step, before it becomes a Condition."""

    type: ConditionType
    ok: bool | None  # None: not known yet (Unknown)
    reason: str
    message: str = ""
    transient: bool = False  # a failure expected to heal by itself (Degraded, retried)
    permanent: bool = False  # a failure only a spec change can fix (Failed)

    @property
    def status(self) -> ConditionStatus:
        """True, False or Unknown, as the condition will say."""
        return _status_of(self.ok)


@dataclass(frozen=True)
class Transition:
    """A condition whose status changed; becomes a Kubernetes Event."""

    type: str
    status: str
    reason: str
    message: str
    warning: bool
    first: bool = False  # the condition did not exist before


def worth_an_event(transition: Transition) -> bool:
    """Whether a transition becomes an Event: not a sub-condition that starts out True.

    A product that comes up healthy then says so once (Ready), not once per condition: at a
    thousand products applied at once, six Events each were most of the API server's writes.
    Failures, recoveries, reason changes and every Ready transition are still posted.
    """
    return transition.warning or not transition.first or transition.type == ConditionType.ready.value


def utcnow() -> datetime:
    """Now, in UTC, to the second (what the API server stores)."""
    return datetime.now(UTC).replace(microsecond=0)


def _status_of(ok: bool | None) -> ConditionStatus:
    return ConditionStatus.unknown if ok is None else (ConditionStatus.true if ok else ConditionStatus.false)


def merge_conditions(
    previous: list[Condition], checks: list[Check], generation: int, now: datetime | None = None
) -> tuple[list[Condition], list[Transition]]:
    """New conditions from this reconcile's checks, keeping lastTransitionTime where status held."""
    now = now or utcnow()
    by_type = {c.type: c for c in previous}
    result: list[Condition] = []
    transitions: list[Transition] = []
    for check in checks:
        status = _status_of(check.ok)
        old = by_type.pop(check.type.value, None)
        changed = old is None or old.status != status.value
        result.append(
            Condition(
                type=check.type.value,
                status=status,
                reason=check.reason,
                message=check.message,
                last_transition_time=now if changed or old is None else old.last_transition_time,
                observed_generation=generation,
            )
        )
        if changed or (old is not None and old.reason != check.reason):
            transitions.append(
                Transition(
                    check.type.value,
                    status.value,
                    check.reason,
                    check.message,
                    warning=check.ok is False,
                    first=old is None,
                )
            )
    # Conditions this reconcile did not evaluate (e.g. SLAMet between SLA checks) are kept.
    result.extend(by_type.values())
    order = {t.value: i for i, t in enumerate(ConditionType)}
    result.sort(key=lambda c: order.get(c.type, len(order)))
    return result, transitions


def ready_check(checks: list[Check]) -> Check:
    """The Ready condition summarising the gating checks."""
    gating = [c for c in checks if c.type in GATING]
    for bad in (c for c in gating if c.permanent):
        return Check(ConditionType.ready, False, bad.reason, bad.message, permanent=True)
    for bad in (c for c in gating if c.transient):
        return Check(ConditionType.ready, False, bad.reason, bad.message, transient=True)
    for pending in (c for c in gating if not c.ok):
        return Check(ConditionType.ready, False, pending.reason, pending.message)
    if not gating:
        # Nothing evaluated yet: Ready must not claim True (kstatus would call it current).
        return Check(ConditionType.ready, None, "Pending", "waiting for the operator to reconcile it")
    return Check(ConditionType.ready, True, "Reconciled", "all resources of the product are in place")


def arrival_status(now: datetime | None = None) -> DataProductStatus:
    """What a product shows from its arrival until its first reconcile ends: Pending, Ready Unknown.

    Written as soon as the operator sees the product, so a burst never shows a blank phase while
    products wait for a worker or an ingestion slot; no generation is claimed as observed yet.
    """
    pending = ready_check([])
    condition = Condition(
        type=pending.type.value,
        status=ConditionStatus.unknown,
        reason=pending.reason,
        message=pending.message,
        last_transition_time=now or utcnow(),
    )
    return DataProductStatus(phase=phase_of([]), conditions=[condition], message=pending.message)


def phase_of(checks: list[Check]) -> Phase:
    """Pending, Provisioning, Ready, Degraded or Failed, from this reconcile's checks."""
    if not checks:
        return Phase.pending
    if any(c.permanent for c in checks):
        return Phase.failed
    if any(c.transient for c in checks):
        return Phase.degraded
    if all(c.ok for c in checks if c.type in GATING):
        return Phase.ready
    return Phase.provisioning


def apply_checks(
    status: DataProductStatus, checks: list[Check], generation: int, now: datetime | None = None
) -> tuple[DataProductStatus, list[Transition]]:
    """Status with this reconcile's conditions, Ready, phase and observedGeneration set."""
    checks = [c for c in checks if c.type is not ConditionType.ready]
    ready = ready_check(checks)
    conditions, transitions = merge_conditions(status.conditions, [*checks, ready], generation, now)
    new = status.model_copy(
        update={
            "conditions": conditions,
            "phase": phase_of(checks).value,
            "observed_generation": generation,
            "message": ready.message,
        }
    )
    return new, transitions
