"""Leader election between operator replicas, over a coordination.k8s.io Lease.

Only the leader runs kopf, and so only the leader opens the store: a standby waits (its
liveness endpoint answering all along) and takes over once the lease expires or is released.
A leader that cannot renew within its deadline stops kopf through its stop flag and exits
non-zero, so Kubernetes restarts it as a standby; if kopf has not stopped by the time a standby
could see the lease expire, the process exits at once. Either way two replicas never reconcile
at the same time. The decisions are the plain functions of :mod:`datamesh.core.election`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import signal
import socket
import threading
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from datamesh.controller import metrics
from datamesh.core.election import (
    Action,
    ElectionTiming,
    LeaseConflict,
    LeasePort,
    LeaseRecord,
    Observation,
    claimed,
    decide,
    failure_delay,
    observe,
    released,
    renew_deadline,
    standby_delay,
    write_deadline,
)

log = logging.getLogger(__name__)

PROBE_TIMEOUT_SECONDS = 5.0  # kopf's probes, asked by the liveness endpoint of a leader
EXIT_LOST = 1  # leadership lost, or the operator failed: Kubernetes restarts the container
Lead = Callable[[asyncio.Event], Coroutine[Any, Any, None]]
LeasesFactory = Callable[[], contextlib.AbstractAsyncContextManager[LeasePort]]


def identity_of(environ: Mapping[str, str] = os.environ) -> str:
    """This process's holder identity: its pod's name (POD_NAME, else the host name) and a random suffix."""
    # The suffix tells a restarted container (same pod name) from the process it replaces.
    return f"{environ.get('POD_NAME') or socket.gethostname()}_{secrets.token_hex(4)}"


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` or until ``stop`` is set; whether it was set."""
    if seconds > 0 and not stop.is_set():
        try:
            async with asyncio.timeout(seconds):
                await stop.wait()
        except TimeoutError:
            pass
    return stop.is_set()


class Elector:
    """One process's side of the election: waits for the lease, renews it, gives it up."""

    def __init__(
        self,
        leases: LeasePort,
        identity: str,
        timing: ElectionTiming,
        *,
        lease_name: str,
        rand: Callable[[], float] = random.random,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.leases = leases
        self.identity = identity
        self.timing = timing
        self.lease_name = lease_name
        self.rand = rand
        self.wall = wall
        self.role = "standby"  # standby | leader | lost | released
        self.holder: str | None = None
        self.observation: Observation | None = None
        self.record: LeaseRecord | None = None
        self.renewed_at = 0.0  # loop time at which the last successful write was sent
        self.lost_reason: str | None = None
        self.superseded = False  # lost to another holder, who may be reconciling already
        self._watchdog: asyncio.TimerHandle | None = None
        self._on_lost: Callable[[str], None] | None = None

    def state(self) -> dict[str, Any]:
        """What the liveness endpoint reports."""
        return {"role": self.role, "identity": self.identity, "holder": self.holder, "lease": self.lease_name}

    # ---- standing by ---------------------------------------------------------------------------

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Stand by until this process holds the lease (True), or ``stop`` is set (False)."""
        failures = 0
        started = asyncio.get_running_loop().time()
        while not stop.is_set():
            try:
                delay = await self._try_acquire()
                failures = 0
            except LeaseConflict as exc:
                log.info("another process wrote the lease first (%s); looking again", exc)
                delay = 0.0
            except Exception as exc:
                failures += 1
                delay = failure_delay(failures, self.timing)
                log.warning(
                    "cannot read or write lease %s (failure %d, next try in %.1fs): %s",
                    self.lease_name,
                    failures,
                    delay,
                    _describe(exc),
                )
            if self.role == "leader":
                waited = asyncio.get_running_loop().time() - started
                log.info(
                    "leadership acquired: %s holds lease %s after %.1fs (transitions %d); starting the operator",
                    self.identity,
                    self.lease_name,
                    waited,
                    self.record.transitions if self.record else 0,
                )
                return True
            if await _wait(stop, delay):
                break
        return False

    async def _try_acquire(self) -> float:
        """One look at the lease, taking it when free; the seconds until the next look."""
        loop = asyncio.get_running_loop()
        record = await self.leases.read()
        now = loop.time()
        self.observation = observe(self.observation, record, now)
        action = decide(self.identity, self.observation, now)
        if action is Action.WAIT:
            holder = record.holder if record else None
            if holder != self.holder:
                log.info("standing by: lease %s is held by %s", self.lease_name, holder)
            self.holder = holder
            return standby_delay(self.observation, now, self.timing, self.rand)
        if action is Action.TAKE_OVER and record is not None and record.holder:
            log.info("lease %s of %s expired; taking over", self.lease_name, record.holder)
        sent = loop.time()
        claim = claimed(record, self.identity, self.wall(), self.timing)
        written = await (self.leases.create(claim) if record is None else self.leases.replace(claim))
        self.record, self.renewed_at, self.holder, self.role = written, sent, self.identity, "leader"
        metrics.LEADER.set(1)
        return 0.0

    # ---- leading -------------------------------------------------------------------------------

    async def keep(self, stop: asyncio.Event, on_lost: Callable[[str], None]) -> None:
        """Renew the lease every retry period until ``stop`` is set or it is lost.

        ``on_lost`` runs synchronously from a timer at the renew deadline (or when another holder
        shows up), so after a pause of the whole process it runs before any other task resumes.
        """
        loop = asyncio.get_running_loop()
        self._on_lost = on_lost
        self._arm(loop)
        pause = self.timing.retry_seconds
        try:
            while self.role == "leader":
                if await _wait(stop, pause) or self.role != "leader":
                    return
                pause = self.timing.retry_seconds / 2  # after a failure, try again sooner
                try:
                    # No attempt outlives the deadline; the watchdog acts on it.
                    async with asyncio.timeout_at(renew_deadline(self.renewed_at, self.timing)):
                        await self._renew(loop)
                    pause = self.timing.retry_seconds
                except TimeoutError:
                    log.warning("renewing lease %s timed out", self.lease_name)
                except Exception as exc:
                    left = renew_deadline(self.renewed_at, self.timing) - loop.time()
                    log.warning(
                        "renewing lease %s failed (%.1fs left before giving up): %s",
                        self.lease_name,
                        left,
                        _describe(exc),
                    )
        finally:
            self._disarm()

    async def _renew(self, loop: asyncio.AbstractEventLoop) -> None:
        for _ in range(2):
            sent = loop.time()
            try:
                written = await self.leases.replace(claimed(self.record, self.identity, self.wall(), self.timing))
            except LeaseConflict:
                current = await self.leases.read()
                if current is None or current.holder != self.identity:
                    self.superseded = current is not None and bool(current.holder)
                    self._lose(f"the lease is now held by {current.holder if current else 'nobody (it was deleted)'}")
                    return
                self.record = current  # a write of ours landed after its answer was lost: renew over it
                continue
            if self.role == "leader":
                self.record, self.renewed_at = written, sent
                self._arm(loop)
            return

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        self._disarm()
        reason = f"the lease was not renewed within {self.timing.renew_deadline_seconds:g}s"
        self._watchdog = loop.call_at(renew_deadline(self.renewed_at, self.timing), self._lose, reason)

    def _disarm(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _lose(self, reason: str) -> None:
        if self.role != "leader":
            return
        self.role, self.lost_reason = "lost", reason
        self._disarm()
        metrics.LEADER.set(0)
        log.error(
            "leadership lost: %s holds lease %s no longer (%s); stopping the operator",
            self.identity,
            self.lease_name,
            reason,
        )
        if self._on_lost is not None:
            self._on_lost(reason)

    async def release(self) -> None:
        """Give the lease up, so a standby takes over at its next look rather than at the expiry."""
        if self.role != "leader" or self.record is None:
            return
        self.role = "released"
        self._disarm()
        metrics.LEADER.set(0)
        try:
            async with asyncio.timeout(self.timing.retry_seconds):
                await self.leases.replace(released(self.record, self.wall()))
        except Exception as exc:
            log.warning(
                "lease %s not released (a standby takes over when it expires): %s", self.lease_name, _describe(exc)
            )
            return
        log.info("leadership released: lease %s is free", self.lease_name)


def _describe(exc: BaseException) -> str:
    """An API error in one line, with what to do about a refusal."""
    status = getattr(exc, "status", None)
    if status == 403:
        return "forbidden: the operator's account needs get, create and update on leases (coordination.k8s.io)"
    if status == 404:
        return "not found: does the platform namespace (DATAMESH_PLATFORM_NAMESPACE) exist?"
    if status is not None:
        return f"HTTP {status} {getattr(exc, 'reason', '')}".strip()
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class HealthServer:
    """The liveness endpoint of an elected operator: its role for a standby; for the leader, also
    kopf's probes (products, progress), whose failure (a stalled operator) answers as kopf's does.

    kopf serves its probes on ``operator_endpoint``, a loopback port of its own: the public endpoint
    has to answer before kopf runs (a standby) and after it stops, so it cannot be kopf's.
    """

    def __init__(self, endpoint: str, elector: Elector, operator_endpoint: str | None = None) -> None:
        url = urlsplit(endpoint)
        self.host = url.hostname or "0.0.0.0"
        self.port = url.port or 80
        self.path = url.path or "/"
        self.elector = elector
        self.operator_endpoint = operator_endpoint
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Listen on the endpoint's address."""
        app = web.Application()
        app.router.add_get(self.path, self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, reuse_address=True).start()
        self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_SECONDS))

    async def _health(self, request: web.Request) -> web.Response:
        state = self.elector.state()
        if self.operator_endpoint is None or self._client is None or state.get("role") != "leader":
            return web.json_response(state)
        try:
            async with self._client.get(self.operator_endpoint) as answer:
                status, text = answer.status, await answer.text()
        except TimeoutError:
            state["operator"] = f"kopf's probes did not answer within {PROBE_TIMEOUT_SECONDS:g}s"
            return web.json_response(state, status=503)
        except aiohttp.ClientError as exc:
            # Not listening yet (kopf starting) or any more (stopping): alive, nothing to report.
            state["operator"] = f"kopf's probes not served ({_describe(exc)})"
            return web.json_response(state)
        if status != 200:
            state["operator"] = text.strip()[:1000]
            return web.json_response(state, status=status)
        try:
            probes = json.loads(text)
        except ValueError:
            probes = {"operator": text[:1000]}
        return web.json_response({**probes, **state} if isinstance(probes, dict) else state)

    async def stop(self) -> None:
        """Stop listening."""
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _install_signal_handlers(stop: asyncio.Event) -> None:
    # SIGTERM while standing by (kopf installs its own while it runs, and stops itself on them).
    if threading.current_thread() is threading.main_thread():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)


def _exit_now(hard_exit: Callable[[int], None], reason: str) -> None:
    log.critical("the operator did not stop before lease expiry (%s); exiting now", reason)
    for handler in logging.getLogger().handlers:
        handler.flush()
    hard_exit(EXIT_LOST)


async def run_elected(
    lead: Lead,
    elector: Elector,
    *,
    liveness_endpoint: str | None = None,
    operator_liveness: str | None = None,
    stop_flag: asyncio.Event | None = None,
    handle_signals: bool = False,
    hard_exit: Callable[[int], None] = os._exit,
    keeper_leases: LeasesFactory | None = None,
) -> int:
    """Run ``lead(stop)`` only while ``elector`` holds the lease; the process's exit code.

    0 when stopped (``stop_flag``, a signal, or ``lead`` returning); 1 when leadership was lost
    or ``lead`` failed. ``hard_exit`` ends the process when a deposed leader would not stop in time.
    The lease is renewed from a thread of its own, through ``keeper_leases()`` when the elector's
    port is bound to this loop (a Kubernetes client), else through the elector's port. The leader's
    liveness endpoint includes what kopf's own, at ``operator_liveness``, answers.
    """
    stop = stop_flag or asyncio.Event()
    health = HealthServer(liveness_endpoint, elector, operator_liveness) if liveness_endpoint else None
    if health is not None:
        await health.start()
    if handle_signals:
        _install_signal_handlers(stop)
    timing = elector.timing
    log.info(
        "leader election: %s stands for lease %s (lease %gs, renew deadline %gs, retry %gs)",
        elector.identity,
        elector.lease_name,
        timing.lease_seconds,
        timing.renew_deadline_seconds,
        timing.retry_seconds,
    )
    try:
        if not await elector.acquire(stop):
            log.info("stopped while standing by")
            return 0
        code = await _lead(lead, elector, stop, hard_exit, keeper_leases)
        if handle_signals:
            _install_signal_handlers(stop)  # kopf's handlers point at its finished run
        return code
    finally:
        if health is not None:
            await health.stop()


async def _lead(
    lead: Lead,
    elector: Elector,
    stop: asyncio.Event,
    hard_exit: Callable[[int], None],
    keeper_leases: LeasesFactory | None,
) -> int:
    main_loop = asyncio.get_running_loop()
    kopf_stop = asyncio.Event()

    def stop_operator() -> None:
        main_loop.call_soon_threadsafe(kopf_stop.set)

    keeper = _KeeperThread(elector, keeper_leases, hard_exit, stop_operator)
    keeper.start()
    stopper = asyncio.create_task(stop.wait(), name="datamesh stop waiter")
    leader = asyncio.create_task(lead(kopf_stop), name="datamesh leader")
    try:
        await asyncio.wait({leader, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not leader.done():
            kopf_stop.set()  # stopped from outside: kopf finishes gracefully while the lease is still ours
            await asyncio.wait({leader})
        failure = None if leader.cancelled() else leader.exception()
        if elector.role == "lost":
            log.error("the operator stopped after losing leadership; exiting with %d", EXIT_LOST)
            return EXIT_LOST
        if failure is not None:
            log.error("the operator failed; giving up the lease", exc_info=failure)
            return EXIT_LOST
        return 0
    finally:
        stopper.cancel()
        # kopf has stopped: the keeper cancels its exit timer and releases the lease if it still holds it.
        await asyncio.to_thread(keeper.finish, elector.timing.retry_seconds * 2)


class _KeeperThread:
    """Renews the lease from a thread and event loop of its own.

    A leader whose loop is busy with hundreds of reconciles is slow, not dead: on the operator's
    loop its renewals queued behind them and it lost the lease under load. Here they keep their
    pace, and the watchdog and the exit timer fire on time whatever the operator's loop is doing.
    """

    def __init__(
        self,
        elector: Elector,
        leases: LeasesFactory | None,
        hard_exit: Callable[[int], None],
        stop_operator: Callable[[], None],
    ) -> None:
        self.elector = elector
        self.leases = leases
        self.hard_exit = hard_exit
        self.stop_operator = stop_operator
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finished: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="datamesh-lease-keeper", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def finish(self, timeout: float) -> None:
        """Stop renewing, release the lease if still held, and wait for the thread (blocking)."""
        if self._loop is not None and self._finished is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._finished.set)
        self._thread.join(timeout)

    def _run(self) -> None:
        asyncio.run(self._keep())

    async def _keep(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop, self._finished = loop, asyncio.Event()
        self._ready.set()
        exit_timer: asyncio.TimerHandle | None = None

        def lost(reason: str) -> None:
            nonlocal exit_timer
            self.stop_operator()
            deadline = write_deadline(self.elector.renewed_at, self.elector.timing)
            if self.elector.superseded or loop.time() >= deadline:
                _exit_now(self.hard_exit, reason)  # before any other write of ours can land
            else:
                exit_timer = loop.call_at(deadline, _exit_now, self.hard_exit, reason)

        async with contextlib.AsyncExitStack() as stack:
            if self.leases is not None:
                # A client of this loop's own: the operator's is bound to the operator's loop.
                self.elector.leases = await stack.enter_async_context(self.leases())
            await self.elector.keep(self._finished, lost)
            await self._finished.wait()  # kopf has stopped (or exits at the timer)
            if exit_timer is not None:
                exit_timer.cancel()  # kopf stopped in time: exit normally
            await self.elector.release()
