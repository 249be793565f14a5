"""A burst of products through an API server restart and an etcd freeze: all Ready, nothing twice.

The operator is never restarted: its watches break and resume, its writes fail or hang and are
retried. In the end every product is Ready, its collection holds exactly ``status.records``
points (no row ingested twice) and it is in the catalog ConfigMaps exactly once.
"""

from __future__ import annotations

import time

from datamesh_dev import devcluster
from tests.faults.helpers import (
    apply_all,
    assert_no_duplicates,
    create_namespace,
    delete_namespace_products,
    phases,
    products,
    wait_all_ready,
)
from tests.harness import Kubectl, OperatorThread, wait_for

NS = "faults-burst"
COUNT = 240


def test_a_burst_survives_an_api_server_restart_and_an_etcd_freeze(
    kubectl: Kubectl, operator: OperatorThread, control_plane: devcluster.ControlPlane
) -> None:
    create_namespace(kubectl, NS)
    first, second = products(NS, COUNT // 2, prefix="a", rows=4), products(NS, COUNT // 2, prefix="b", rows=4)
    try:
        started = time.monotonic()
        apply_all(kubectl, first)
        # The API server goes away while the first half is being reconciled.
        wait_for(lambda: phases(kubectl, NS)["Ready"] >= 10, 120, what="the first products Ready")
        control_plane.restart_apiserver()
        restarted = time.monotonic() - started
        apply_all(kubectl, second)
        # etcd freezes while the second half is being reconciled: writes hang, then go through.
        wait_for(lambda: phases(kubectl, NS)["Ready"] >= COUNT // 2 + 10, 180, what="more products Ready")
        frozen_at = time.monotonic() - started
        with control_plane.etcd_paused():
            time.sleep(10)
        at_freeze = phases(kubectl, NS)
        wait_all_ready(kubectl, NS, COUNT, timeout=300)
        total = time.monotonic() - started
        print(
            f"\n{COUNT} products: API server restarted at {restarted:.1f} s, etcd frozen 10 s at {frozen_at:.1f} s "
            f"(phases after: {dict(at_freeze)}), all Ready after {total:.1f} s"
        )
        assert_no_duplicates(kubectl, operator, NS)
    finally:
        delete_namespace_products(kubectl, NS)
