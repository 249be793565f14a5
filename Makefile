# The two set-up commands of the README: `make run` (the main job) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# pytest keeps its assertion-rewritten test modules as bytecode in __pycache__; with writing off (as
# some machines set it) every pytest process and xdist worker re-rewrites ~400 modules (~5 s each).
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(BIN)/pytest

.PHONY: run cluster-run test test-unit test-browser browser-deps test-cluster e2e e2e-cleanup image lint crd tools clean bench screenshot

# The runtime package with its test and lint tools, and the development tooling in dev/.
$(VENV)/.installed: pyproject.toml dev/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,lint]' -e dev/
	touch $@

# Main job: the examples reconciled into the embedded store, and the query API and catalog page on 127.0.0.1:8080.
run: $(VENV)/.installed
	$(BIN)/datamesh local examples/

# The same on a real (local) control plane: CRD, examples, and the operator in the foreground.
DEV := $(BIN)/datamesh-dev
cluster-run: $(VENV)/.installed
	$(DEV) up
	$(DEV) kubectl apply --server-side -f crds/
	$(DEV) kubectl create namespace datamesh-system --dry-run=client -o yaml | $(DEV) kubectl apply -f -
	$(DEV) kubectl apply -f examples/
	KUBECONFIG=$$($(BIN)/python -c 'from datamesh_dev import devcluster; print(devcluster.default_workdir() / "kubeconfig")') \
	  DATAMESH_METRICS_PORT=0 $(BIN)/datamesh operator --liveness http://127.0.0.1:8081/healthz

# Every test: the lint gates first (seconds), then the unit tier, the browser tier, then the cluster
# and faults tiers. Builds the control plane from the Go module proxy on first use (cached after).
test: lint test-unit test-browser test-cluster

# The fast loop: no control plane, no Go tools, no browser; on every core (the tests share no state).
test-unit: $(VENV)/.installed
	$(PYTEST) -m "not cluster and not browser" -n auto --dist worksteal

# Debian's chromium, for the browser tier and the screenshot (apt, as root or through sudo; a no-op once installed).
browser-deps:
	hack/browser/install-deps.sh

# The catalog page in Debian's chromium, driven by Playwright (one browser per module, so not split across workers).
test-browser: $(VENV)/.installed browser-deps
	$(PYTEST) -m "browser and not cluster"

# docs/catalog-page.png: the page over the examples served as `make run` serves them.
screenshot: $(VENV)/.installed browser-deps
	$(BIN)/python -m datamesh_dev.browser screenshot docs/catalog-page.png

# The real control plane, started once for the whole session (so not split across workers).
test-cluster: $(VENV)/.installed
	$(PYTEST) -m "cluster and not e2e"

# The real-node tier (root): OS packages from apt, kubelet/kube-proxy/pause built like the other
# tools (cached), the image built without Docker (cached by input hash), then tests/e2e/: a real
# node, the chart installed for real, and the machine checked to be as it was before.
e2e: $(VENV)/.installed
	hack/e2e/install-deps.sh
	hack/build-tools.sh etcd k8s helm kwok node pause >/dev/null
	$(PYTEST) -m e2e tests/e2e

# Undo a real node whose test process died (from the baseline it saved).
e2e-cleanup: $(VENV)/.installed
	$(BIN)/python -m datamesh_dev.node cleanup

# The project's OCI image without Docker (prints image=, archive=, ...; cached by input hash).
image: $(VENV)/.installed
	hack/image/build.sh

lint: $(VENV)/.installed
	$(BIN)/ruff check operator dev tests bench
	$(BIN)/ruff format --check operator dev tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

crd: $(VENV)/.installed
	$(BIN)/datamesh crd --write crds/
	$(BIN)/datamesh crd --write charts/datamesh/crds/

tools:
	hack/build-tools.sh

bench: $(VENV)/.installed
	$(BIN)/python bench/reconcile.py

clean:
	rm -rf $(VENV) .dev-cluster.env
