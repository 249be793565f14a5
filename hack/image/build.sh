#!/usr/bin/env bash
# Builds the project's OCI image without Docker (see dev/datamesh_dev/image.py): a root
# filesystem from Debian packages with Debian's python3.11, a virtualenv with the project's wheel
# and its dependencies from PyPI, packed with umoci, a docker-archive made with skopeo.
# Cached by a hash of its inputs; prints image=<ref>, archive=<docker-archive>, oci=<layout>,
# cached=, seconds=, compressed_mb=, uncompressed_mb=. Needs root and hack/e2e/install-deps.sh.
#
#   hack/image/build.sh [--extras parquet] [--force]
#   ctr -n k8s.io images import "$(hack/image/build.sh | sed -n 's/^archive=//p')"
set -euo pipefail
cd "$(dirname "$0")/../.."
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || { echo "error: $python not found: run \`make .venv/.installed\` first" >&2; exit 1; }
exec "$python" -m datamesh_dev.image build "$@"
