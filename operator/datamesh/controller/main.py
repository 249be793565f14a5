"""Running the operator: kopf over the handlers' registry."""

from __future__ import annotations

import asyncio

import kopf

from datamesh.controller.handlers import build_registry, kopf_settings
from datamesh.core.ports import VectorStore
from datamesh.settings import OperatorSettings


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
