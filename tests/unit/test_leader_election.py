"""Leader election without a cluster: the lease decisions, the Lease wire format, and the elector
over an in-memory lease with the API server's optimistic concurrency (a write over a stale
resourceVersion is refused). The real thing, two operator processes on the real control plane, is
tests/faults/test_leader_election.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import cast
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from aiohttp import web
from kubernetes_asyncio import client

from datamesh.adapters.kube import lease_body, lease_record, micro_time
from datamesh.controller.leader import EXIT_LOST, Elector, HealthServer, identity_of, run_elected
from datamesh.core.election import (
    Action,
    ElectionTiming,
    LeaseConflict,
    LeaseRecord,
    claimed,
    decide,
    expired,
    expires_in,
    failure_delay,
    observe,
    released,
    renew_deadline,
    standby_delay,
    write_deadline,
)
from datamesh.settings import OperatorSettings
from datamesh.web.serving import LOOPBACK, free_port

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
TIMING = ElectionTiming(10, 7, 2)


def held(by: str | None, version: str = "1", duration: int = 10) -> LeaseRecord:
    return LeaseRecord(by, duration, T0, T0, 3, version)


# ==== decisions =================================================================================


def test_a_missing_lease_is_created() -> None:
    assert decide("a", observe(None, None, 0.0), 0.0) is Action.CREATE


def test_a_live_lease_of_another_is_waited_for_until_unchanged_for_its_duration() -> None:
    seen = observe(None, held("b"), 100.0)
    for now in (100.0, 105.0, 109.9):
        assert decide("a", seen, now) is Action.WAIT
        assert not expired(seen, now)
    assert expires_in(seen, 104.0) == pytest.approx(6.0)
    assert decide("a", seen, 110.0) is Action.TAKE_OVER


def test_expiry_counts_from_when_the_record_was_first_seen_not_from_its_renew_time() -> None:
    # A renewTime an hour old (another machine's clock) does not make a lease just seen expired.
    stale_clock = replace(held("b"), renewed_at=T0 - timedelta(hours=1))
    assert decide("a", observe(None, stale_clock, 50.0), 50.1) is Action.WAIT


def test_every_renewal_restarts_the_wait() -> None:
    seen = observe(None, held("b", version="1"), 0.0)
    assert observe(seen, held("b", version="1"), 8.0) is seen, "an unchanged record keeps its first sighting"
    renewed = observe(seen, held("b", version="2"), 8.0)
    assert renewed.since == 8.0
    assert decide("a", renewed, 12.0) is Action.WAIT
    assert decide("a", renewed, 18.0) is Action.TAKE_OVER


def test_a_released_lease_is_taken_at_once() -> None:
    seen = observe(None, released(held("b"), T0), 0.0)
    assert expired(seen, 0.0) and expires_in(seen, 0.0) == 0.0
    assert decide("a", seen, 0.0) is Action.TAKE_OVER


def test_a_lease_naming_us_is_renewed() -> None:
    # Our write landed but its answer was lost: the lease is ours, not someone else's to wait for.
    assert decide("a", observe(None, held("a"), 0.0), 0.0) is Action.RENEW


def test_claiming_counts_transitions_and_keeps_the_acquire_time_on_renewal() -> None:
    first = claimed(None, "a", T0, TIMING)
    assert (first.holder, first.duration_seconds, first.transitions, first.version) == ("a", 10, 0, None)
    later = T0 + timedelta(seconds=2)
    renewal = claimed(replace(first, version="7"), "a", later, TIMING)
    assert (renewal.acquired_at, renewal.renewed_at, renewal.transitions, renewal.version) == (T0, later, 0, "7")
    takeover = claimed(held("b", version="9"), "a", later, TIMING)
    assert (takeover.holder, takeover.acquired_at, takeover.transitions, takeover.version) == ("a", later, 4, "9")


def test_the_leader_gives_up_before_anyone_may_take_over() -> None:
    # Counted from when the last renewal was sent, never later than when a standby saw it.
    sent = 100.0
    assert renew_deadline(sent, TIMING) == 107.0
    assert renew_deadline(sent, TIMING) < write_deadline(sent, TIMING) < sent + TIMING.lease_seconds


def test_timing_must_leave_the_leader_time_to_give_up() -> None:
    for bad in ((7, 7, 2), (10, 7, 4), (10, 7, 0)):
        with pytest.raises(ValueError):
            ElectionTiming(*bad)
    with pytest.raises(ValueError):
        OperatorSettings(leader_election_lease_seconds=5, leader_election_renew_deadline_seconds=6)
    settings = OperatorSettings()
    assert (settings.leader_election, settings.leader_election_lease_name) == (True, "datamesh-operator")


def test_a_standby_looks_again_within_a_jittered_period_or_right_at_the_expiry() -> None:
    seen = observe(None, held("b"), 0.0)
    assert standby_delay(seen, 0.0, TIMING, lambda: 0.0) == 2.0
    assert standby_delay(seen, 0.0, TIMING, lambda: 1.0) == 2.5
    assert standby_delay(seen, 9.0, TIMING, lambda: 1.0) == pytest.approx(1.05), "not a period past the expiry"
    assert standby_delay(observe(None, None, 0.0), 0.0, TIMING, lambda: 0.0) == 2.0


def test_failures_back_off_up_to_four_periods() -> None:
    delays = [failure_delay(n, TIMING) for n in range(1, 8)]
    assert all(0 < d <= 8.0 for d in delays) and max(delays) > 2.0


def test_identity_is_the_pod_name_and_a_random_suffix() -> None:
    a, b = identity_of({"POD_NAME": "dm-operator-7d9f-x2"}), identity_of({"POD_NAME": "dm-operator-7d9f-x2"})
    assert a.startswith("dm-operator-7d9f-x2_") and a != b
    assert identity_of({}).rsplit("_", 1)[0]


# ==== the Lease as the API server has it ==========================================================


def test_lease_times_are_micro_times_the_api_server_parses() -> None:
    # Go's RFC3339Micro wants exactly six fractional digits; isoformat() drops them at .000000.
    assert micro_time(T0) == "2025-01-02T03:04:05.000000Z"
    assert micro_time(T0.astimezone(ZoneInfo("Europe/Paris"))) == "2025-01-02T03:04:05.000000Z"


async def test_lease_body_and_record_round_trip() -> None:
    record = LeaseRecord("a_1", 10, T0, T0 + timedelta(microseconds=5), 2, "42")
    body = lease_body("datamesh-system", "datamesh-operator", record)
    assert body["metadata"]["resourceVersion"] == "42" and body["metadata"]["name"] == "datamesh-operator"
    assert body["spec"]["renewTime"] == "2025-01-02T03:04:05.000005Z"
    async with client.ApiClient() as api:  # the client's own parsing of what the API server sends
        lease = api.deserialize(_Response(body), "V1Lease")
    assert lease_record(lease) == record
    fresh = lease_body("ns", "n", replace(record, version=None, holder=None))
    assert "resourceVersion" not in fresh["metadata"] and fresh["spec"]["holderIdentity"] is None


class _Response:
    """What the client deserialises: the body as the API server would send it."""

    def __init__(self, body: dict[str, object]) -> None:
        self.data = json.dumps(body)


# ==== the elector over an in-memory lease ==========================================================


class MemoryLease:
    """One lease with resourceVersions, as the API server keeps it; ``fail`` makes calls raise."""

    def __init__(self) -> None:
        self.record: LeaseRecord | None = None
        self.versions = itertools.count(1)
        self.fail: Exception | None = None
        self.writes = 0

    async def read(self) -> LeaseRecord | None:
        await asyncio.sleep(0)
        if self.fail:
            raise self.fail
        return self.record

    async def create(self, record: LeaseRecord) -> LeaseRecord:
        return self._write(record, create=True)

    async def replace(self, record: LeaseRecord) -> LeaseRecord:
        return self._write(record, create=False)

    def _write(self, record: LeaseRecord, create: bool) -> LeaseRecord:
        if self.fail:
            raise self.fail
        if create and self.record is not None:
            raise LeaseConflict("exists")
        if not create and (self.record is None or self.record.version != record.version):
            raise LeaseConflict("stale")
        self.writes += 1
        self.record = replace(record, version=str(next(self.versions)))
        return self.record


FAST = ElectionTiming(0.6, 0.4, 0.1)


def elector(lease: MemoryLease, name: str) -> Elector:
    return Elector(lease, name, FAST, lease_name="ns/lease", rand=lambda: 0.0)


async def test_one_of_two_leads_and_the_other_takes_over_when_it_stops_renewing() -> None:
    lease = MemoryLease()
    a, b = elector(lease, "a"), elector(lease, "b")
    stop = asyncio.Event()
    assert await a.acquire(stop) and a.role == "leader" and lease.record and lease.record.holder == "a"
    b_task = asyncio.create_task(b.acquire(stop))
    await asyncio.sleep(0.3)
    assert not b_task.done() and b.role == "standby" and b.holder == "a"
    # "a" dies without a word: its lease stays, unrenewed, until its duration has passed.
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(b_task, 2)
    waited = asyncio.get_running_loop().time() - started
    assert lease.record.holder == "b" and lease.record.transitions == 1
    assert FAST.lease_seconds - 0.35 <= waited <= FAST.lease_seconds + 0.2


async def test_a_leader_that_cannot_renew_is_lost_at_its_deadline_and_never_after_the_expiry() -> None:
    lease = MemoryLease()
    a = elector(lease, "a")
    assert await a.acquire(asyncio.Event())
    lost_at: list[float] = []
    loop = asyncio.get_running_loop()
    keeper = asyncio.create_task(a.keep(asyncio.Event(), lambda reason: lost_at.append(loop.time())))
    await asyncio.sleep(0.35)
    assert a.role == "leader" and lease.writes >= 3, "renewed every retry period"
    lease.fail = ConnectionError("API server unreachable")
    failed_from = a.renewed_at
    await asyncio.wait_for(keeper, 2)
    assert a.role == "lost" and "not renewed" in (a.lost_reason or "")
    assert lost_at and lost_at[0] - failed_from == pytest.approx(FAST.renew_deadline_seconds, abs=0.05)
    assert lost_at[0] < write_deadline(failed_from, FAST)


async def test_a_leader_whose_lease_was_taken_is_lost_at_its_next_renewal() -> None:
    lease = MemoryLease()
    a = elector(lease, "a")
    assert await a.acquire(asyncio.Event())
    assert lease.record is not None
    lease.record = replace(lease.record, holder="intruder", version="999")
    reasons: list[str] = []
    await asyncio.wait_for(a.keep(asyncio.Event(), reasons.append), 1)
    assert a.role == "lost" and a.superseded and reasons == ["the lease is now held by intruder"]


async def test_a_leader_superseded_by_another_holder_exits_at_once() -> None:
    lease = MemoryLease()
    a = elector(lease, "a")
    exited = asyncio.Event()

    async def operator(stop: asyncio.Event) -> None:
        assert lease.record is not None
        lease.record = replace(lease.record, holder="intruder", version="999")
        await asyncio.sleep(60)  # would go on reconciling beside the intruder

    task = asyncio.create_task(run_elected(operator, a, hard_exit=lambda code: exited.set()))
    await asyncio.wait_for(exited.wait(), FAST.retry_seconds + 0.2)
    # At its first renewal, not at the end of the grace a leader that merely failed to renew gets.
    assert asyncio.get_running_loop().time() < write_deadline(a.renewed_at, FAST) - 0.2
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_a_standby_backs_off_on_errors_and_stops_when_asked() -> None:
    lease = MemoryLease()
    lease.fail = ConnectionError("refused")
    stop = asyncio.Event()
    b = elector(lease, "b")
    task = asyncio.create_task(b.acquire(stop))
    await asyncio.sleep(0.2)
    stop.set()
    assert await asyncio.wait_for(task, 1) is False and b.role == "standby"


async def test_run_elected_stops_the_operator_when_leadership_is_lost() -> None:
    lease = MemoryLease()
    a = elector(lease, "a")
    ran = asyncio.Event()
    stopped_by_flag = asyncio.Event()
    exits: list[int] = []

    async def operator(stop: asyncio.Event) -> None:
        ran.set()
        await stop.wait()
        stopped_by_flag.set()

    async def break_the_api() -> None:
        await ran.wait()
        lease.fail = ConnectionError("partitioned")

    breaker = asyncio.create_task(break_the_api())
    code = await asyncio.wait_for(run_elected(operator, a, hard_exit=exits.append), 3)
    await breaker
    assert code == EXIT_LOST and stopped_by_flag.is_set() and a.role == "lost"
    assert not exits, "the operator stopped in time: no hard exit"


async def test_a_deposed_leader_that_will_not_stop_is_exited_before_the_lease_expires() -> None:
    lease = MemoryLease()
    a = elector(lease, "a")
    exited = asyncio.Event()
    exited_at: list[float] = []
    loop = asyncio.get_running_loop()

    async def stubborn(stop: asyncio.Event) -> None:
        await stop.wait()
        await asyncio.sleep(60)  # ignores its stop flag

    def hard_exit(code: int) -> None:  # os._exit, which would end the process here
        exited_at.append(loop.time())
        exited.set()

    task = asyncio.create_task(run_elected(stubborn, a, hard_exit=hard_exit))
    await asyncio.sleep(0.15)
    lease.fail = ConnectionError("partitioned")
    failed_from = a.renewed_at
    await asyncio.wait_for(exited.wait(), 2)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert exited_at[0] == pytest.approx(write_deadline(failed_from, FAST), abs=0.05)
    assert exited_at[0] < failed_from + FAST.lease_seconds, "gone before any standby may take over"


async def test_run_elected_releases_the_lease_on_a_clean_stop() -> None:
    lease = MemoryLease()
    a = elector(lease, "a")
    stop = asyncio.Event()

    async def operator(kopf_stop: asyncio.Event) -> None:
        stop.set()  # e.g. SIGTERM
        await kopf_stop.wait()

    assert await asyncio.wait_for(run_elected(operator, a, stop_flag=stop), 2) == 0
    assert lease.record is not None and lease.record.holder is None and a.role == "released"
    b = elector(lease, "b")
    assert await asyncio.wait_for(b.acquire(asyncio.Event()), 0.5), "a released lease is taken at once"


class _Role:
    """What HealthServer reads of an elector: its state."""

    def __init__(self, role: str) -> None:
        self.role = role

    def state(self) -> dict[str, str]:
        return {"role": self.role, "identity": "pod-a_1"}


async def _kopf_probes(status: int, body: dict[str, object]) -> tuple[web.AppRunner, str]:
    """A stand-in for kopf's own liveness endpoint on a loopback port: it answers ``status`` and ``body``."""

    async def answer(request: web.Request) -> web.Response:
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_get("/healthz", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, LOOPBACK, port).start()
    return runner, f"http://{LOOPBACK}:{port}/healthz"


async def _ask(role: str, operator_endpoint: str | None) -> tuple[int, dict[str, object]]:
    port = free_port()
    health = HealthServer(f"http://{LOOPBACK}:{port}/healthz", cast(Elector, _Role(role)), operator_endpoint)
    await health.start()
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://{LOOPBACK}:{port}/healthz") as r:
            return r.status, await r.json()
    finally:
        await health.stop()


async def test_the_leaders_liveness_carries_kopfs_probes_and_their_failure() -> None:
    # Elected, kopf's own endpoint is on loopback: a stalled leader must still fail its liveness probe.
    runner, url = await _kopf_probes(200, {"products": 3, "progress": {"inFlight": 1}})
    try:
        status, body = await _ask("leader", url)
        assert status == 200 and body == {
            "products": 3,
            "progress": {"inFlight": 1},
            "role": "leader",
            "identity": "pod-a_1",
        }
        assert await _ask("standby", url) == (200, {"role": "standby", "identity": "pod-a_1"})
    finally:
        await runner.cleanup()
    runner, url = await _kopf_probes(500, {"error": "no reconcile finished for 120s"})
    try:
        status, body = await _ask("leader", url)
        assert status == 500 and body["role"] == "leader" and "no reconcile finished" in str(body["operator"])
    finally:
        await runner.cleanup()
    # kopf not listening yet (starting) or any more (stopping): alive, and it says so.
    status, body = await _ask("leader", f"http://{LOOPBACK}:{free_port()}/healthz")
    assert status == 200 and "not served" in str(body["operator"])
