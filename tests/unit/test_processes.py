"""Child processes for GIL-holding work: real spawned processes, killed for real."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from concurrent.futures.process import BrokenProcessPool

import pytest

from datamesh.adapters.embeddings import builtin, ngram
from datamesh.adapters.embeddings.builtin import BuiltinNgramProvider
from datamesh.adapters.processes import ChildProcesses
from datamesh.core.ports import EmbeddingServiceError


def _exit_now() -> None:
    os._exit(3)  # as a child killed mid-call (out of memory, kill -9) leaves its pool


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


async def test_a_call_runs_in_a_child_and_a_killed_child_is_replaced() -> None:
    children = ChildProcesses(1)
    first = await children.run(os.getpid)
    assert first != os.getpid()
    assert children.pids() == [first]
    _kill(first)
    second = await children.run(os.getpid)  # the dead child's pool is found broken, a new one answers
    assert second not in (first, os.getpid())


async def test_a_call_that_kills_its_child_twice_fails_and_the_next_call_works() -> None:
    children = ChildProcesses(1)
    with pytest.raises(BrokenProcessPool):
        await children.run(_exit_now)
    assert await children.run(sum, [1, 2, 3]) == 6


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_children_without_a_call_for_a_while_exit_and_the_next_call_starts_one() -> None:
    children = ChildProcesses(1, idle_seconds=0.5)
    first = await children.run(os.getpid)
    # A call longer than the idle time does not get its child stopped under it, nor does the one right after.
    assert await children.run(_sleep_then_pid, 1.0) == first
    assert await children.run(os.getpid) == first
    for _ in range(200):  # up to 10 s
        if not _alive(first):
            break
        await asyncio.sleep(0.05)
    assert not _alive(first), "an idle child still runs"
    assert children.pids() == []
    second = await children.run(os.getpid)
    assert second not in (first, os.getpid())


def _sleep_then_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


# Longer than the inline limit: an ingestion batch, embedded in the child process.
BATCH = [f"shipment {i} delayed by a storm at the port of Rotterdam, invoice disputed" for i in range(40)]


async def test_builtin_batches_are_embedded_in_a_child_with_the_same_vectors() -> None:
    provider = BuiltinNgramProvider(384)
    vectors = await provider.embed(BATCH)
    assert vectors == provider.encode(BATCH).tolist()
    assert builtin._ENCODER.pids(), "no embedding process"
    # It holds the model and numpy, not the project's other modules (pydantic and the models: about 13 MiB).
    loaded = set(await builtin._ENCODER.run(eval, "list(__import__('sys').modules)"))
    assert "datamesh.adapters.embeddings.ngram" in loaded
    assert not loaded & {"pydantic", "datamesh.core.ports", "datamesh.adapters.embeddings.builtin"}


async def test_an_ingestion_batch_survives_its_embedding_process_being_killed() -> None:
    provider = BuiltinNgramProvider(384)
    await provider.embed(BATCH)
    for pid in builtin._ENCODER.pids():
        _kill(pid)
    assert await provider.embed(BATCH) == provider.encode(BATCH).tolist()


async def test_an_embedding_process_that_keeps_dying_is_a_transient_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ngram, "encode", _exit_now_with_args)
    with pytest.raises(EmbeddingServiceError, match="embedding process died"):
        await BuiltinNgramProvider(384).embed(BATCH)


def _exit_now_with_args(*_: object) -> None:
    os._exit(3)
