"""Running the operator: kopf over the handlers' registry, alone or only while elected leader."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import kopf

from datamesh.adapters.kube import KubeLeases, api_client
from datamesh.controller.handlers import build_registry, kopf_settings
from datamesh.controller.leader import Elector, Lead, identity_of, run_elected
from datamesh.core.election import ElectionTiming
from datamesh.core.ports import VectorStore
from datamesh.settings import OperatorSettings
from datamesh.web.serving import LOOPBACK, free_port


async def run_operator(
    settings: OperatorSettings,
    *,
    namespaces: list[str] | None = None,
    liveness_endpoint: str | None = None,
    stop_flag: asyncio.Event | None = None,
    ready_flag: asyncio.Event | None = None,
    store: VectorStore | None = None,
    memo: kopf.Memo | None = None,
) -> None:
    """Run the operator until ``stop_flag`` is set (or forever); ``memo`` lets a caller see its runtime."""
    memo = memo if memo is not None else kopf.Memo()
    memo.store, memo.runtime = store, None
    await kopf.operator(
        registry=build_registry(settings, namespaces),
        settings=kopf_settings(settings, namespaces),
        clusterwide=not namespaces,
        namespaces=namespaces or (),
        liveness_endpoint=liveness_endpoint,
        standalone=True,
        memo=memo,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def election_timing(settings: OperatorSettings) -> ElectionTiming:
    """The lease timing the settings ask for."""
    return ElectionTiming(
        float(settings.leader_election_lease_seconds),
        settings.leader_election_renew_deadline_seconds,
        settings.leader_election_retry_seconds,
    )


def loopback_liveness() -> str:
    """An endpoint on a free loopback port, where an elected operator's kopf serves its probes."""
    return f"http://{LOOPBACK}:{free_port()}/healthz"


async def run_operator_elected(
    settings: OperatorSettings,
    *,
    namespaces: list[str] | None = None,
    liveness_endpoint: str | None = None,
    operator_liveness: str | None = None,
    lead: Lead | None = None,
    stop_flag: asyncio.Event | None = None,
    handle_signals: bool = False,
) -> int:
    """Run the operator (or ``lead``) only while this process holds the lease; the exit code (0, or 1 if lost).

    The lease is ``settings.leader_election_lease_name`` in the platform namespace. The liveness
    endpoint is served here, for a standby as for the leader; the leader's adds kopf's probes,
    which kopf serves at ``operator_liveness`` (``lead`` must give it to kopf).
    """

    async def operate(stop: asyncio.Event) -> None:
        await run_operator(settings, namespaces=namespaces, stop_flag=stop, liveness_endpoint=operator_liveness)

    timing = election_timing(settings)

    @contextlib.asynccontextmanager
    async def leases_of_this_loop() -> AsyncIterator[KubeLeases]:
        api = await api_client()
        try:
            # A call may take up to half the renew deadline, which leaves time for one more attempt.
            yield KubeLeases(
                api,
                settings.platform_namespace,
                settings.leader_election_lease_name,
                timeout=timing.renew_deadline_seconds / 2,
            )
        finally:
            await api.close()

    async with leases_of_this_loop() as leases:
        elector = Elector(
            leases,
            identity_of(),
            timing,
            lease_name=f"{settings.platform_namespace}/{settings.leader_election_lease_name}",
        )
        return await run_elected(
            lead or operate,
            elector,
            liveness_endpoint=liveness_endpoint,
            operator_liveness=operator_liveness,
            stop_flag=stop_flag,
            handle_signals=handle_signals,
            keeper_leases=leases_of_this_loop,
        )
