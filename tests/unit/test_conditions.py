"""Conditions in the CloudNativePG style and the phase they add up to."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from datamesh.core.conditions import Check, ConditionType, apply_checks
from datamesh.resource.models import DataProductStatus

T0 = datetime(2026, 1, 1, tzinfo=UTC)
OK = [
    Check(ConditionType.collection_ready, True, "CollectionReady"),
    Check(ConditionType.ingested, True, "Ingested"),
    Check(ConditionType.inference_ready, True, "NotRequested"),
    Check(ConditionType.cataloged, True, "Cataloged"),
]


def test_transition_time_moves_only_when_status_changes() -> None:
    status, transitions = apply_checks(DataProductStatus(), OK, 1, T0)
    assert status.phase == "Ready" and status.observed_generation == 1
    assert {t.type for t in transitions} == {c.type.value for c in OK} | {"Ready"}
    ready = next(c for c in status.conditions if c.type == "Ready")
    assert ready.last_transition_time == T0

    later, transitions = apply_checks(status, OK, 2, T0 + timedelta(hours=1))
    assert transitions == []
    ready = next(c for c in later.conditions if c.type == "Ready")
    assert ready.last_transition_time == T0 and ready.observed_generation == 2

    broken = [*OK[:1], Check(ConditionType.ingested, False, "SourceUnavailable", "down", transient=True), *OK[2:]]
    degraded, transitions = apply_checks(later, broken, 2, T0 + timedelta(hours=2))
    assert degraded.phase == "Degraded"
    assert {t.type for t in transitions} == {"Ingested", "Ready"} and all(t.warning for t in transitions)
    ready = next(c for c in degraded.conditions if c.type == "Ready")
    assert (
        ready.status == "False"
        and ready.reason == "SourceUnavailable"
        and ready.last_transition_time == T0 + timedelta(hours=2)
    )


def test_phases() -> None:
    failed, _ = apply_checks(
        DataProductStatus(), [Check(ConditionType.collection_ready, False, "InvalidSpec", permanent=True)], 1, T0
    )
    assert failed.phase == "Failed"
    pending = [
        Check(ConditionType.inference_ready, False, "DeploymentProgressing")
        if c.type is ConditionType.inference_ready
        else c
        for c in OK
    ]
    provisioning, _ = apply_checks(DataProductStatus(), pending, 1, T0)
    assert provisioning.phase == "Provisioning"
    sla_breach = [*OK, Check(ConditionType.sla_met, False, "SLABreached")]
    still_ready, _ = apply_checks(DataProductStatus(), sla_breach, 1, T0)
    assert still_ready.phase == "Ready", "SLAMet is reported, not gating"
