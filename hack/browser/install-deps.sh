#!/usr/bin/env bash
# Installs Debian's chromium for the browser tier (tests/browser/, driven by Playwright for Python
# with executable_path set to this browser: Playwright's own browser downloads cannot be reached
# from CI). Idempotent: with a chromium on PATH (or DATAMESH_CHROMIUM set) it only says which one.
# Installing needs root or passwordless sudo; without either it fails, naming the command to run.
set -euo pipefail

if [ -n "${DATAMESH_CHROMIUM:-}" ]; then
  [ -x "$DATAMESH_CHROMIUM" ] || { echo "error: DATAMESH_CHROMIUM=$DATAMESH_CHROMIUM is not an executable" >&2; exit 1; }
  echo "chromium: $DATAMESH_CHROMIUM (DATAMESH_CHROMIUM)" >&2
  exit 0
fi
if found=$(command -v chromium); then
  echo "chromium: $found" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: chromium is missing and apt-get is not available: install a Chromium and set DATAMESH_CHROMIUM to it" >&2
  exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "error: chromium is missing: run 'sudo hack/browser/install-deps.sh' (apt-get install chromium)," >&2
  echo "       or set DATAMESH_CHROMIUM to a Chromium you have" >&2
  exit 1
fi
echo "installing chromium (apt)..." >&2
started=$SECONDS
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
# --no-install-recommends: the headless browser needs no desktop integration or extra fonts' packages.
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
echo "chromium: $(command -v chromium) ($(chromium --version 2>/dev/null || echo 'version unknown'); installed in $((SECONDS - started)) s)" >&2
