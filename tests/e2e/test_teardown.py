"""A real node leaves the machine as it found it.

The node changes machine-wide state (datamesh_dev.hoststate lists what is compared): sysctls
the kubelet sets (``vm.overcommit_memory``, ``kernel.panic``, ``kernel.panic_on_oops``) and the
bridge plugin's ``net.ipv4.ip_forward``, iptables/nftables chains (KUBE-*, from the kubelet and
kube-proxy), mounts (the kubelet's root, pod volumes, container root filesystems, network
namespaces), cgroups (``/kubepods``), links (the CNI bridge and veths), routes, folders
(``/var/log/pods``...) and node programs. Here a node runs pods behind a Service (so every kind
of change happens, which the test checks), is stopped, and the machine must equal the baseline
taken before it started; likewise after the chart scenario of test_chart_e2e.py, which runs
before this module.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from datamesh_dev import devcluster, hoststate, image
from datamesh_dev import node as realnode
from tests.e2e.conftest import REPORT, e2e_tools, seconds
from tests.harness import Kubectl, wait_for

HARDENED = {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
NON_ROOT = {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}}
# Retried: a Service's endpoints reach kube-proxy's rules a moment after its pods become Ready.
CLIENT = """
import time, urllib.request
for attempt in range(60):
    try:
        print(urllib.request.urlopen("http://web.default.svc/hostname", timeout=5).read().decode())
        break
    except OSError as exc:
        print("retrying:", exc, flush=True)
        time.sleep(0.5)
else:
    raise SystemExit(1)
"""


def workload(image_ref: str) -> tuple[str, str]:
    """Two web pods (with an emptyDir) behind a Service; a client pod calling it by its DNS name."""
    web = {
        "name": "web",
        "image": image_ref,
        "imagePullPolicy": "Never",
        "command": ["python", "-m", "http.server", "8000", "--directory", "/etc"],
        "ports": [{"name": "http", "containerPort": 8000}],
        "readinessProbe": {"httpGet": {"path": "/hostname", "port": "http"}, "periodSeconds": 1},
        "securityContext": HARDENED,
        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
    }
    objects = [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {
                        "securityContext": NON_ROOT,
                        "containers": [web],
                        "volumes": [{"name": "scratch", "emptyDir": {}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "client", "namespace": "default"},
            "spec": {
                "restartPolicy": "Never",
                "securityContext": NON_ROOT,
                "containers": [
                    {
                        "name": "client",
                        "image": image_ref,
                        "imagePullPolicy": "Never",
                        "command": ["python", "-c", CLIENT],
                        "securityContext": HARDENED,
                    }
                ],
            },
        },
    ]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": objects[:2]}), json.dumps(objects[2])


def test_the_chart_scenario_left_the_machine_as_it_was(machine_baseline: hoststate.HostState) -> None:
    teardown: dict[str, Any] | None = REPORT.get("teardown")
    if teardown is not None:  # test_chart_e2e.py ran in this session
        assert not teardown["errors"], teardown["errors"]
        assert not teardown["diff"], hoststate.describe(teardown["diff"])
    left = hoststate.diff(machine_baseline, hoststate.capture())
    assert not left, hoststate.describe(left)


def test_a_node_with_pods_behind_a_service_is_undone_completely(
    machine_baseline: hoststate.HostState, datamesh_image: image.BuiltImage, tmp_path: Path
) -> None:
    tools = e2e_tools()
    t0 = time.monotonic()
    with devcluster.ControlPlane(
        tmp_path / "control-plane", keep=True, tools=tools, nodes=False, node_address=realnode.node_address()
    ) as cp:
        node = realnode.RealNode(cp, tools=tools, workdir=tmp_path / "node")
        try:
            node.start()
            ready = time.monotonic() - t0
            node.import_image(datamesh_image.archive)
            kubectl = Kubectl(tools["kubectl"], cp.kubeconfig)
            web, client = workload(datamesh_image.ref)
            kubectl.run("apply", "-f", "-", input=web)
            kubectl.run("rollout", "status", "deployment/web", "--timeout=120s", timeout=130)
            kubectl.run("apply", "-f", "-", input=client)

            def client_done() -> str | None:
                phase = ((kubectl.get("pod", "client", "default") or {}).get("status") or {}).get("phase")
                if phase == "Failed":
                    raise AssertionError(f"the client pod failed:\n{kubectl.run('logs', 'client').stdout}")
                return phase if phase == "Succeeded" else None

            wait_for(client_done, timeout=90, what="the client pod to reach the Service by its DNS name")
            assert kubectl.run("logs", "client").stdout.strip().splitlines()[-1].startswith("web-")
            during = hoststate.diff(machine_baseline, hoststate.capture())
        finally:
            left = node.stop()
    REPORT["teardown test"] = {
        "node ready s": seconds(ready),
        "changed while running": sorted(during),
        "teardown s": seconds(node.timings.get("teardown", 0.0)),
        "left": left,
    }
    # The node did change the machine (or this test would prove nothing)...
    assert {"sysctls", "mounts", "cgroups", "links", "paths", "processes"} <= set(during), sorted(during)
    assert "iptables" in during or "nftables" in during
    for key in ("vm.overcommit_memory", "kernel.panic", "kernel.panic_on_oops", "net.ipv4.ip_forward"):
        assert key in during["sysctls"], json.dumps(during["sysctls"], indent=1)
    assert any(realnode.BRIDGE in link for link in during["links"]["added"])
    assert any("kubepods" in d for tree in during["cgroups"].values() for d in tree.get("added", []))
    assert any("KUBE-" in text["after"] for text in during.get("iptables", {}).values()) or "KUBE-" in str(
        during.get("nftables")
    )
    # ...and put every bit of it back.
    assert not node.teardown_errors, node.teardown_errors
    assert not left, hoststate.describe(left)
    assert not hoststate.diff(machine_baseline, hoststate.capture())
