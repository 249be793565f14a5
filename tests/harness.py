"""Test helpers: the operator running in a thread of the test process, and kubectl calls."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import kopf

from datamesh.adapters.stores import open_store
from datamesh.controller.main import run_operator
from datamesh.core.ports import VectorStore
from datamesh.settings import OperatorSettings, StoreSettings
from datamesh.web.serving import free_port
from tests.httpserver import LoopThread

T = TypeVar("T")


class Helm:
    """The helm built by hack/build-tools.sh, with its own config/cache folders."""

    def __init__(self, binary: Path, home: Path, kubeconfig: Path | None = None) -> None:
        self.binary = binary
        self.env = {
            **os.environ,
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }
        if kubeconfig is not None:
            self.env["KUBECONFIG"] = str(kubeconfig)

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, env=self.env, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}{result.stdout}")
        return result


class Kubectl:
    """The kubectl built by hack/build-tools.sh, against one kubeconfig."""

    def __init__(self, binary: Path, kubeconfig: Path) -> None:
        self.binary = binary
        self.kubeconfig = kubeconfig

    def run(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.binary), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "-o", "json").stdout)

    def get(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        result = self.run("get", kind, name, "-n", namespace, "-o", "json", check=False)
        if result.returncode != 0:
            if "NotFound" in result.stderr:
                return None
            raise AssertionError(result.stderr)
        return json.loads(result.stdout)


REPO = Path(__file__).resolve().parents[1]


def bench_script(name: str) -> ModuleType:
    """``bench/<name>.py`` imported as the module ``bench_<name>`` (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def wait_for(predicate: Callable[[], T], timeout: float = 60, interval: float = 0.25, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class OperatorThread(LoopThread):
    """The kopf operator in a thread with its own event loop, sharing one embedded Qdrant.

    The store outlives restarts of the operator (``stop()`` then ``start()``), as a Qdrant
    server would; ``call()`` runs a coroutine on the operator's loop (the store's owner), and
    ``serving()`` serves an app there (e.g. the query service sharing the store). kopf's liveness
    endpoint is served at ``liveness_url``; ``memo`` is the running operator's (``memo.runtime``).
    """

    def __init__(self, settings: OperatorSettings) -> None:
        super().__init__("operator-loop")
        self.settings = settings
        self.store: VectorStore = self.call(self._make_store())
        self.liveness_url = f"http://127.0.0.1:{free_port()}/healthz"
        self.memo = kopf.Memo()
        self._task: asyncio.Future[None] | None = None
        self._stop: asyncio.Event | None = None

    @staticmethod
    async def _make_store() -> VectorStore:
        return open_store(StoreSettings(url=None, path=":memory:"))

    def start(self, timeout: float = 60) -> None:
        async def begin() -> tuple[asyncio.Event, asyncio.Event]:
            return asyncio.Event(), asyncio.Event()

        self._stop, ready = self.call(begin())
        self.memo = kopf.Memo()
        operator = run_operator(
            self.settings,
            stop_flag=self._stop,
            ready_flag=ready,
            store=self.store,
            memo=self.memo,
            liveness_endpoint=self.liveness_url,
        )
        self._task = asyncio.run_coroutine_threadsafe(operator, self.loop)
        deadline = time.monotonic() + timeout
        while not ready.is_set():
            if self._task.done():
                self._task.result()  # raises the operator's start-up error
                raise AssertionError("the operator exited during start-up")
            if time.monotonic() > deadline:
                raise AssertionError("the operator did not become ready")
            time.sleep(0.05)

    @contextlib.contextmanager
    def reconfigured(self, **overrides: Any) -> Iterator[None]:
        """Run with other settings for a while (same store): stopped and started with them, then back."""
        original = self.settings
        self.stop()
        self.settings = original.model_copy(update=overrides)
        self.start()
        try:
            yield
        finally:
            self.stop()
            self.settings = original
            self.start()

    def stop(self, timeout: float = 60) -> None:
        if self._task is None or self._stop is None:
            return
        self.loop.call_soon_threadsafe(self._stop.set)
        self._task.result(timeout)
        self._task = None

    def close(self) -> None:
        self.stop()
        self.call(self.store.close())
        super().close()


class OperatorProcess:
    """``datamesh operator`` as a process of its own (so it can be killed or paused), logging to a file.

    ``env`` is added to this process' environment without its ``DATAMESH_*`` and ``KUBERNETES_*``
    variables; ``health_port`` is where its ``--liveness`` endpoint listens.
    """

    def __init__(self, args: list[str], env: dict[str, str], log: Path, health_port: int, cwd: Path) -> None:
        script = Path(sys.executable).with_name("datamesh")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "datamesh"]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("DATAMESH_", "KUBERNETES_"))}
        full_env.update(env)
        self.log = log
        self.health_port = health_port
        liveness = f"--liveness=http://127.0.0.1:{health_port}/healthz"
        self._start = ([*command, "operator", liveness, *args], full_env, cwd)
        log.write_bytes(b"")
        self.restart()

    def restart(self) -> None:
        """Start it again (as Kubernetes restarts a container), appending to the same log."""
        argv, env, cwd = self._start
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self, what: str = "") -> bool:
        """True while it runs; AssertionError with the tail of its log once it has exited."""
        if self.proc.poll() is not None:
            raise AssertionError(
                f"operator {self.pid} exited ({self.proc.returncode}) {what}:\n{self.log_text()[-4000:]}"
            )
        return True

    def health(self) -> dict[str, Any] | None:
        """Its liveness endpoint's JSON, or None when it does not answer 200."""
        try:
            url = f"http://127.0.0.1:{self.health_port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as r:
                return json.loads(r.read()) if r.status == 200 else None
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """SIGKILL, and wait for it to be gone."""
        self.proc.kill()
        self.proc.wait(10)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused process would not act on SIGTERM
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode
