from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from datamesh_dev import devcluster

if TYPE_CHECKING:
    from datamesh.settings import OperatorSettings
    from tests.harness import Helm, Kubectl, OperatorThread

# ==== markers ===============================================================================
# Applied from what a test uses, never by hand, so `pytest -m "not cluster"` is the fast loop:
#   cluster: needs the real control plane, or tools built from Go modules (kubectl, helm);
#   faults:  the fault-injection tier under tests/faults/ (on the control plane too);
#   e2e:     a real node on this machine, the image built without Docker, the chart installed
#            (tests/e2e/; needs root). Left out unless asked for: pyproject's addopts has
#            `-m "not e2e"`, and `make e2e` runs `pytest -m e2e tests/e2e`. e2e tests are
#            cluster tests too, and get a longer timeout (cold image and tool builds).
#   browser: drives Debian's chromium with Playwright (tests/browser/). `make test-unit` leaves
#            it out (no system browser needed for the fast loop); `make test-browser` (part of
#            `make test`) installs chromium first. Without chromium these tests error, never skip.

_TOOL_FIXTURES = {"control_plane", "helm_binary"}
_E2E_FIXTURES = {"machine_baseline", "datamesh_image", "e2e_cluster"}
_BROWSER_FIXTURES = {"browser"}
E2E_TIMEOUT_S = 1800
_FAULTS = Path(__file__).resolve().parent / "faults"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if _TOOL_FIXTURES & fixtures or _E2E_FIXTURES & fixtures:
            item.add_marker(pytest.mark.cluster)
        if _E2E_FIXTURES & fixtures:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.timeout(E2E_TIMEOUT_S))
        if _FAULTS in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.faults)
        if _BROWSER_FIXTURES & fixtures:
            item.add_marker(pytest.mark.browser)


# ==== control plane (datamesh_dev.devcluster) ===============================================
# One real etcd + kube-apiserver + kube-controller-manager + kube-scheduler, with a kwok node,
# for the whole pytest session.
# DATAMESH_TEST_KUBECONFIG=<path> runs against an existing cluster instead. If the control
# plane cannot be built or started, every test using it errors: it is never skipped.

_tools: dict[str, Path] | devcluster.ControlPlaneError | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    # Build the binaries here, outside every test's timeout: a cold build takes 20+ minutes.
    global _tools
    fixtures = [set(getattr(i, "fixturenames", ())) for i in session.items]
    if not any((_TOOL_FIXTURES | _E2E_FIXTURES) & f for f in fixtures):
        return
    # The e2e tier also needs the node agents and the pod sandbox binary.
    e2e = ("node", "pause") if any(_E2E_FIXTURES & f for f in fixtures) else ()
    capman = session.config.pluginmanager.getplugin("capturemanager")
    show = capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()
    try:
        with show:  # let the user watch the build's progress
            _tools = devcluster.tool_paths((*devcluster.DEFAULT_TOOLS, *e2e))
    except devcluster.ControlPlaneError as e:
        _tools = e


def _built_tools() -> dict[str, Path]:
    global _tools
    if _tools is None:  # fixture requested dynamically, so the collection hook did not build
        _tools = devcluster.tool_paths()
    if isinstance(_tools, devcluster.ControlPlaneError):
        raise _tools
    return _tools


@pytest.fixture(scope="session")
def control_plane() -> Iterator[devcluster.ControlPlane | devcluster.ExternalCluster]:
    """The session's cluster; KUBECONFIG points at it while the session runs."""
    external = os.environ.get("DATAMESH_TEST_KUBECONFIG")
    with pytest.MonkeyPatch.context() as mp:
        if external:
            cluster = devcluster.ExternalCluster(Path(external), tools=_built_tools())
            mp.setenv("KUBECONFIG", str(cluster.kubeconfig))
            yield cluster
            return
        with devcluster.ControlPlane(tools=_built_tools()) as cp:
            mp.setenv("KUBECONFIG", str(cp.kubeconfig))
            yield cp


@pytest.fixture(scope="session")
def fake_node(control_plane: devcluster.ControlPlane | devcluster.ExternalCluster) -> str:
    """A Ready node that kwok plays: pods scheduled there become Ready without running."""
    if isinstance(control_plane, devcluster.ControlPlane):
        return control_plane.node_names[0]
    return "kwok-node-0"  # an external dev cluster started by `datamesh-dev up` has the same node


@pytest.fixture(scope="session")
def kubeconfig(control_plane: devcluster.ControlPlane | devcluster.ExternalCluster) -> Path:
    return control_plane.kubeconfig


@pytest.fixture(scope="session")
def helm_binary() -> Path:
    return _built_tools()["helm"]


@pytest.fixture(scope="session")
def helm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("helm-home")


@pytest.fixture(scope="session")
def helm(helm_binary: Path, helm_home: Path) -> Helm:
    """helm for rendering and linting (no cluster)."""
    from tests.harness import Helm

    return Helm(helm_binary, helm_home)


@pytest.fixture(scope="session")
def kube_version() -> str:
    # This helm build does not embed a Kubernetes version (it assumes v1.20 without a cluster),
    # so give it the pinned control plane's version, which the chart's kubeVersion accepts.
    return devcluster.pinned_kubernetes_version()


# ==== end of control plane ==================================================================


# ==== the DataProduct CRD and the operator =================================================

REPO = Path(__file__).resolve().parents[1]
PLATFORM_NAMESPACE = "datamesh-system"


@pytest.fixture(scope="session")
def kubectl(control_plane: devcluster.ControlPlane | devcluster.ExternalCluster) -> Kubectl:
    from tests.harness import Kubectl

    return Kubectl(control_plane.kubectl, control_plane.kubeconfig)


@pytest.fixture(scope="session")
def crd_installed(kubectl: Kubectl) -> None:
    """The committed CRD applied and established, and the platform namespace created."""
    from tests.harness import wait_for

    kubectl.run("apply", "--server-side", "-f", str(REPO / "crds"))

    def established() -> bool:
        # Polled: `kubectl wait` right after creation can fail on a CRD with no status yet.
        crd = kubectl.get("crd", "dataproducts.datamesh.io", "default") or {}
        return any(
            c["type"] == "Established" and c["status"] == "True"
            for c in (crd.get("status") or {}).get("conditions") or []
        )

    wait_for(established, 60, what="the DataProduct CRD to be Established")
    kubectl.run("create", "namespace", PLATFORM_NAMESPACE, check=False)


def operator_settings(**overrides: object) -> OperatorSettings:
    """Settings tuned for tests: fast retries and timers, no metrics port."""
    from datamesh.settings import OperatorSettings

    values: dict[str, object] = {
        "platform_namespace": PLATFORM_NAMESPACE,
        "sla_check_seconds": 5.0,
        "retry_base_seconds": 0.5,
        "retry_max_seconds": 4.0,
        "catalog_flush_seconds": 0.3,
        "url_timeout": 3.0,
        "metrics_port": 0,
        "liveness_stall_seconds": 5.0,
    }
    values.update(overrides)
    return OperatorSettings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def operator(crd_installed: None, kubeconfig: Path) -> Iterator[OperatorThread]:
    """The operator, running for the whole session in a thread of the test process."""
    from tests.harness import OperatorThread

    op = OperatorThread(operator_settings())
    op.start()
    try:
        yield op
    finally:
        op.close()
