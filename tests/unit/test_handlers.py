"""The change handler's last step: a product is marked handled only once its status is written."""

from __future__ import annotations

from typing import Any, cast

import kopf
import pytest

from datamesh.controller.handlers import write_outcome
from datamesh.controller.runtime import Runtime
from datamesh.core.conditions import arrival_status
from datamesh.engine.reconciler import Outcome

BODY = kopf.Body({"metadata": {"namespace": "shop", "name": "orders", "uid": "u1"}, "spec": {}})


class Kube:
    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.written: list[dict[str, Any]] = []

    async def patch_product_status(self, *args: Any) -> None:
        if self.fail:
            raise ConnectionError("api server unreachable")
        self.written.append(args[-1])


class FakeRuntime:
    def __init__(self, fail: bool) -> None:
        self.kube = Kube(fail)


async def test_the_status_is_written_before_the_handler_returns() -> None:
    # kopf records the handled spec after the handler returns: the status must be on the object by then.
    runtime = FakeRuntime(fail=False)
    await write_outcome(cast(Runtime, runtime), Outcome(status=arrival_status()), BODY)
    assert [s["phase"] for s in runtime.kube.written] == ["Pending"]


async def test_a_status_that_cannot_be_written_leaves_the_product_unhandled() -> None:
    # A TemporaryError: kopf retries the handler and records nothing as handled meanwhile.
    with pytest.raises(kopf.TemporaryError, match=r"status not written.*api server unreachable"):
        await write_outcome(cast(Runtime, FakeRuntime(fail=True)), Outcome(status=arrival_status()), BODY)
