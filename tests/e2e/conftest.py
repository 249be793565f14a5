"""Fixtures of the real-node e2e tier: the machine's baseline, the image, a control plane with a real node.

Every test here uses one of ``machine_baseline``, ``datamesh_image`` or ``e2e_cluster``, so
tests/conftest.py marks it ``e2e`` (and ``cluster``): the default ``pytest`` run leaves these
out, ``make e2e`` runs them (as root). Timings and the teardown result are collected in
:data:`REPORT`, printed at the end of the run and written to ``<basetemp>/e2e-report.json``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from datamesh_dev import devcluster, hoststate, image
from datamesh_dev import node as realnode
from tests.conftest import _built_tools
from tests.harness import Helm, Kubectl

REPORT: dict[str, Any] = {}


def e2e_tools() -> dict[str, Path]:
    """The control plane's tools plus kubelet, kube-proxy and the pause binary."""
    tools = _built_tools()
    if "kubelet" not in tools or "pause" not in tools:
        tools = {**tools, **devcluster.tool_paths(("node", "pause"))}
    return tools


def seconds(value: float) -> float:
    return round(value, 1)


@pytest.fixture(scope="session")
def machine_baseline() -> hoststate.HostState:
    """The machine before any node of this session (the teardown tests compare against it)."""
    if os.geteuid() != 0:
        pytest.fail("the e2e tier needs root: it runs kubelet, containerd and iptables (sudo make e2e)")
    if realnode.STATE.exists() or realnode.RUN.exists():
        pytest.fail(f"{realnode.STATE} exists: a node was not torn down; run `python -m datamesh_dev.node cleanup`")
    return hoststate.capture()


@pytest.fixture(scope="session")
def datamesh_image(machine_baseline: hoststate.HostState) -> image.BuiltImage:
    """The project's image, built without Docker (or found in the cache)."""
    built = image.build_image()
    REPORT["image"] = built.summary()
    return built


@dataclass
class E2ECluster:
    cp: devcluster.ControlPlane
    node: realnode.RealNode
    image: image.BuiltImage
    kubectl: Kubectl
    helm: Helm


@pytest.fixture(scope="module")
def e2e_cluster(
    machine_baseline: hoststate.HostState,
    datamesh_image: image.BuiltImage,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[E2ECluster]:
    """A control plane without kwok, a real node joined to it, the image imported; torn down after the module."""
    tools = e2e_tools()
    workdir = tmp_path_factory.mktemp("e2e-cluster")
    t0 = time.monotonic()
    cp = devcluster.ControlPlane(
        workdir / "control-plane", keep=True, tools=tools, nodes=False, node_address=realnode.node_address()
    )
    cp.start()
    node = realnode.RealNode(cp, tools=tools, workdir=workdir / "node")
    try:
        node.start()
        REPORT["node"] = {
            "control plane + node ready s": seconds(time.monotonic() - t0),
            "kubelet start to node Ready s": seconds(node.timings["kubelet-to-node-ready"]),
            "node start total s": seconds(node.timings["node-ready-total"]),
            "image import s": seconds(node.import_image(datamesh_image.archive)),
        }
        helm = Helm(tools["helm"], workdir / "helm-home", cp.kubeconfig)
        yield E2ECluster(cp, node, datamesh_image, Kubectl(tools["kubectl"], cp.kubeconfig), helm)
        REPORT["changed while the node ran"] = sorted(hoststate.diff(machine_baseline, hoststate.capture()))
    finally:
        try:
            diff = node.stop()
            REPORT["teardown"] = {
                "diff": diff,
                "errors": node.teardown_errors,
                "seconds": seconds(node.timings.get("teardown", 0.0)),
            }
        finally:
            cp.stop()
            REPORT.setdefault("logs", str(workdir))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not REPORT:
        return
    text = json.dumps(REPORT, indent=1, sort_keys=True, default=str)
    terminalreporter.write_sep("=", "e2e report")
    terminalreporter.write_line(text)
    basetemp = getattr(config, "_tmp_path_factory", None)
    if basetemp is not None:
        path = Path(basetemp.getbasetemp()) / "e2e-report.json"
        path.write_text(text + "\n")
        terminalreporter.write_line(f"(written to {path})")
