"""kopf's liveness endpoint fails while the operator makes no progress, and recovers by itself.

etcd is frozen while reconciles are in flight: their catalog writes hang, none finishes, and
/healthz (what the chart's livenessProbe asks) answers 500 naming the stall; once etcd is back,
/healthz answers 200 again and every product becomes Ready without a restart.
"""

from __future__ import annotations

import json
import time

from datamesh_dev import devcluster
from tests.faults.helpers import (
    apply_all,
    create_namespace,
    delete_namespace_products,
    healthz,
    products,
    statuses,
    wait_all_ready,
)
from tests.harness import Kubectl, OperatorThread, wait_for

NS = "faults-liveness"
COUNT = 30
FREEZE_S = 35.0


def test_liveness_fails_while_nothing_finishes_and_recovers(
    kubectl: Kubectl, operator: OperatorThread, control_plane: devcluster.ControlPlane
) -> None:
    stall = operator.settings.liveness_stall_seconds
    create_namespace(kubectl, NS)
    _, body = wait_for(lambda: (r := healthz(operator.liveness_url))[0] == 200 and r, 30, what="/healthz 200")
    assert "progress" in json.loads(body), body
    try:
        apply_all(kubectl, products(NS, COUNT, rows=20), parallel=2)
        # Freeze etcd once the operator has begun: the first products got their Pending status.
        wait_for(lambda: any((dp.get("status") or {}).get("phase") for dp in statuses(kubectl, NS).values()), 30)
        answers: list[tuple[float, int, str]] = []
        frozen = time.monotonic()
        with control_plane.etcd_paused():
            while time.monotonic() - frozen < FREEZE_S:
                code, text = healthz(operator.liveness_url)
                answers.append((time.monotonic() - frozen, code, text))
                time.sleep(0.5)
        failed = [(t, text) for t, code, text in answers if code == 500]
        print(
            f"\n/healthz with etcd frozen for {FREEZE_S:.0f} s (stall limit {stall:g} s): first 500 after "
            f"{failed[0][0] if failed else float('nan'):.1f} s, {len(failed)} of {len(answers)} answers failed"
        )
        assert failed, f"/healthz never failed while etcd was frozen: {answers[-3:]}"
        assert failed[0][0] > stall, "it fails only after the stall limit"

        recovered = wait_for(
            lambda: (r := healthz(operator.liveness_url))[0] == 200 and r, 60, interval=0.5, what="/healthz 200 again"
        )
        assert "progress" in json.loads(recovered[1])
        wait_all_ready(kubectl, NS, COUNT, timeout=180)
    finally:
        delete_namespace_products(kubectl, NS)
