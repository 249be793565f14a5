#!/usr/bin/env bash
# Builds the test/dev control plane (etcd, kube-apiserver, kube-controller-manager), kubectl
# and helm from the Go module proxy at the versions pinned in hack/tools/*/go.mod, into
#   ${DATAMESH_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/datamesh/tools}/<tool>-<version>/
# A tool already in the cache is not rebuilt. Prints "<name>=<path>" for every binary.
#
# Usage: hack/build-tools.sh [etcd|k8s|helm ...]   (default: all)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${DATAMESH_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/datamesh/tools}"

if ! command -v go >/dev/null 2>&1; then
  echo "error: the Go toolchain is needed to build the control plane (go not found on PATH)." >&2
  echo "       Install Go 1.24 or newer (https://go.dev/doc/install) and run this again." >&2
  exit 3
fi

# The version a tools module pins for one module path.
pinned() { (cd "$here/tools/$1" && go list -m -f '{{.Version}}' "$2"); }

# build <tools-module> <cache-key> <ldflags> <out-name>=<package> ...
build() {
  local mod="$1" key="$2" ldflags="$3"; shift 3
  local dest="$cache/$key"
  local missing=0 spec
  for spec in "$@"; do [ -x "$dest/${spec%%=*}" ] || missing=1; done
  if [ "$missing" = 1 ]; then
    mkdir -p "$dest.partial"
    for spec in "$@"; do
      echo "building ${spec%%=*} ($key), this takes a while on first use..." >&2
      (cd "$here/tools/$mod" && CGO_ENABLED=0 go build -trimpath -tags selinux,notest \
        -ldflags "$ldflags" -o "$dest.partial/${spec%%=*}" "${spec#*=}")
    done
    # Publish the folder only once every binary in it is built, so an interrupted build
    # is never mistaken for a cached one.
    rm -rf "$dest" && mv "$dest.partial" "$dest"
  fi
  for spec in "$@"; do echo "${spec%%=*}=$dest/${spec%%=*}"; done
}

build_etcd() {
  local v; v="$(pinned etcd go.etcd.io/etcd/server/v3)"
  build etcd "etcd-$v" "-s -w" etcd=go.etcd.io/etcd/server/v3
}

build_k8s() {
  local v; v="$(pinned k8s k8s.io/kubernetes)"
  local minor="${v#v1.}"; minor="${minor%%.*}"
  local pkg=k8s.io/component-base/version
  local ld="-s -w -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ld="$ld -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  # kubectl reads its own copy of the version package from client-go.
  ld="$ld -X k8s.io/client-go/pkg/version.gitVersion=$v -X k8s.io/client-go/pkg/version.gitMajor=1"
  ld="$ld -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  build k8s "kubernetes-$v" "$ld" \
    kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver \
    kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager \
    kubectl=k8s.io/kubernetes/cmd/kubectl
}

build_helm() {
  local v; v="$(pinned helm helm.sh/helm/v3)"
  build helm "helm-$v" "-s -w -X helm.sh/helm/v3/internal/version.version=$v" helm=helm.sh/helm/v3/cmd/helm
}

targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(etcd k8s helm)
for t in "${targets[@]}"; do
  case "$t" in
    etcd|k8s|helm) "build_$t" ;;
    *) echo "error: unknown tool '$t' (expected etcd, k8s or helm)" >&2; exit 2 ;;
  esac
done
