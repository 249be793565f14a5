"""Pure parts of the operator's reliability: the liveness heartbeat, check timing, Events, the diff-base."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import kopf
from kubernetes_asyncio.client.exceptions import ApiException

from datamesh.adapters.kube import api_error
from datamesh.controller.diffbase import DigestDiffBaseStorage, digest_essence
from datamesh.controller.handlers import first_check
from datamesh.core.conditions import Check, ConditionType, apply_checks, arrival_status, worth_an_event
from datamesh.core.sla import first_check_in, next_check_in
from datamesh.engine.heartbeat import Heartbeat
from datamesh.resource.models import DataProductSpec, DataProductStatus

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_heartbeat_stalls_only_while_work_is_in_flight_and_nothing_finishes() -> None:
    clock = Clock()
    beat = Heartbeat(clock)
    clock.now += 3600  # a long idle spell is not a stall
    assert beat.stall(60) is None
    with beat.working():
        clock.now += 30
        assert beat.stall(60) is None, "the wait starts when the work does, not at the last progress"
        clock.now += 31
        assert "no reconcile finished for 61 s while 1 are in flight" in (beat.stall(60) or "")
        beat.beat()  # e.g. an ingestion batch written
        assert beat.stall(60) is None
        clock.now += 61
        assert beat.stall(60) is not None
    assert beat.stall(60) is None and beat.in_flight == 0


def spec(refresh: str | None = None) -> DataProductSpec:
    source: dict[str, object] = {"inline": [{"id": "a"}]}
    if refresh:
        source["refreshInterval"] = refresh
    return DataProductSpec.model_validate(
        {
            "domain": "d",
            "description": "a product for timing tests",
            "schema": {"fields": [{"name": "id", "primaryKey": True}]},
            "source": source,
        }
    )


def test_a_refresh_interval_shorter_than_the_check_period_sets_the_pace() -> None:
    assert next_check_in(spec(), T0, T0, 60) == 60
    assert next_check_in(spec("1h"), T0, T0, 60) == 60
    assert next_check_in(spec("20s"), T0, T0, 60) == 20
    assert next_check_in(spec("20s"), T0, T0 + timedelta(seconds=15), 60) == 5
    # A refresh that failed when due is tried again one interval later, not in a tight loop.
    assert next_check_in(spec("20s"), T0, T0 + timedelta(seconds=45), 60) == 20
    assert next_check_in(spec("20s"), None, T0, 60) == 20, "never ingested: look again one interval on"
    assert next_check_in(spec("1h"), None, T0, 60) == 60


def test_checks_after_a_restart_are_spread_over_half_a_period_and_stable() -> None:
    delays = [first_check_in(f"uid-{i}", 60) for i in range(1000)]
    assert all(0 <= d < 30 for d in delays)
    assert min(delays) < 1.5 and max(delays) > 28.5, "spread over the whole half period"
    assert sum(d < 15 for d in delays) in range(400, 600)
    assert first_check_in("uid-1", 60) == delays[1]


def test_a_new_product_is_first_checked_one_period_after_it_arrives_a_known_one_within_the_spread() -> None:
    # A new one's change handler reconciles it now: a check within the restart spread would redo that.
    pending = arrival_status(T0).wire_status()
    assert {first_check(body({"domain": "d"}, uid=f"uid-{i}"), 60) for i in range(200)} == {60}
    assert {first_check(body({"domain": "d"}, uid=f"uid-{i}", status=pending), 60) for i in range(50)} == {60}
    handled = {"observedGeneration": 1}
    known = [first_check(body({"domain": "d"}, uid=f"uid-{i}", status=handled), 60) for i in range(200)]
    assert all(0 <= d < 30 for d in known) and len(set(known)) > 150
    assert [first_check_in(f"uid-{i}", 60) for i in range(200)] == known
    # A refresh due sooner than a period still sets the pace.
    refreshed = spec("20s").model_dump(by_alias=True, mode="json", exclude_none=True)
    assert first_check(body(refreshed, uid="uid-1"), 60) == 20


def test_a_healthy_first_reconcile_posts_one_event_failures_and_recoveries_each_one() -> None:
    ok = [
        Check(ConditionType.collection_ready, True, "CollectionReady"),
        Check(ConditionType.ingested, True, "Ingested"),
        Check(ConditionType.inference_ready, True, "NotRequested"),
        Check(ConditionType.cataloged, True, "Cataloged"),
    ]
    status, transitions = apply_checks(DataProductStatus(), ok, 1, T0)
    assert [t.type for t in transitions if worth_an_event(t)] == ["Ready"]
    down = [ok[0], Check(ConditionType.ingested, False, "SourceUnavailable", "down", transient=True), *ok[2:]]
    status, transitions = apply_checks(status, down, 1, T0)
    assert sorted(t.type for t in transitions if worth_an_event(t)) == ["Ingested", "Ready"]
    _, transitions = apply_checks(status, ok, 1, T0)
    assert sorted(t.type for t in transitions if worth_an_event(t)) == ["Ingested", "Ready"]


def test_arrival_status_is_pending_with_ready_unknown_and_no_generation_claimed() -> None:
    status = arrival_status(T0).wire_status()
    assert status["phase"] == "Pending" and status["observedGeneration"] is None
    (ready,) = status["conditions"]
    assert ready["type"] == "Ready" and ready["status"] == "Unknown" and ready["reason"] == "Pending"


def body(
    spec_: dict[str, object],
    annotations: dict[str, str] | None = None,
    uid: str = "u",
    status: dict[str, object] | None = None,
) -> kopf.Body:
    meta = {"name": "p", "namespace": "n", "uid": uid, "annotations": annotations or {}, "labels": {"a": "b"}}
    raw = {"apiVersion": "datamesh.io/v1alpha1", "kind": "DataProduct", "metadata": meta, "spec": spec_}
    return kopf.Body({**raw, "status": status} if status is not None else raw)


def test_the_diff_base_holds_digests_of_bounded_size_and_still_shows_every_spec_change() -> None:
    storage = DigestDiffBaseStorage(prefix="datamesh.io", key="last-handled-configuration")
    big = {"domain": "d", "source": {"inline": [{"id": str(i), "text": "😀" * 256} for i in range(40)]}}
    patch = kopf.Patch()
    storage.store(body=body(big), patch=patch, essence=storage.build(body=body(big)))
    stored = patch["metadata"]["annotations"]["datamesh.io/last-handled-configuration"]
    assert len(stored) < 300, stored
    handled = body(big, {"datamesh.io/last-handled-configuration": stored})
    assert storage.fetch(body=handled) == storage.build(body=handled), "unchanged spec: no diff"
    edited = json.loads(json.dumps(big))
    edited["source"]["inline"][39]["text"] = "changed"
    changed = body(edited, {"datamesh.io/last-handled-configuration": stored})
    old, new = storage.fetch(body=changed), storage.build(body=changed)
    assert old is not None and old["spec"]["source"] != new["spec"]["source"]
    assert old["spec"]["domain"] == new["spec"]["domain"]
    # An annotation written whole by an earlier version reads as the same digests: no spurious update.
    legacy = json.dumps({"spec": big, "metadata": {"labels": {"a": "b"}}})
    upgraded = body(big, {"datamesh.io/last-handled-configuration": legacy})
    assert storage.fetch(body=upgraded) == storage.build(body=upgraded) == digest_essence({"spec": big})


def test_api_errors_are_one_line_with_the_api_servers_own_message() -> None:
    exc = ApiException(status=500, reason="Internal Server Error")
    exc.body = json.dumps({"kind": "Status", "message": "etcdserver: request timed out", "code": 500})
    assert api_error(exc) == "HTTP 500 Internal Server Error: etcdserver: request timed out"
    assert api_error(TimeoutError()) == "no answer from the API server within 15 s"
