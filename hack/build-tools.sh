#!/usr/bin/env bash
# Builds the test/dev control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler), kubectl, helm and kwok (simulated nodes) from the Go module proxy at the
# versions pinned in hack/tools/*/go.mod, and on request the real-node agents (kubelet,
# kube-proxy: target node) and the pod sandbox binary of hack/e2e/pause (target pause), into
#   ${DATAMESH_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/datamesh/tools}/<tool>-<version>/
# A binary already in the cache is not rebuilt: a cached folder lacking one that this script
# now lists (e.g. kube-scheduler, added later) gets only that one built, and the folder is
# republished whole. Prints "<name>=<path>" for every binary.
#
# Usage: hack/build-tools.sh [etcd|k8s|helm|kwok|node|pause ...]
#        (default: etcd k8s helm kwok; node and pause only for the e2e tier, `make e2e`)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${DATAMESH_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/datamesh/tools}"

if ! command -v go >/dev/null 2>&1; then
  echo "error: the Go toolchain is needed to build the control plane (go not found on PATH)." >&2
  echo "       Install Go 1.26 or newer (https://go.dev/doc/install) and run this again." >&2
  exit 3
fi

# The version a tools module pins for one module path.
pinned() { (cd "$here/tools/$1" && go list -m -f '{{.Version}}' "$2"); }

# build <tools-module> <cache-key> <ldflags> <out-name>=<package> ...
# (<tools-module> is a folder under hack/tools/, or a path relative to hack/ such as e2e/pause.)
build() {
  local mod="$1" key="$2" ldflags="$3"; shift 3
  local moddir="$here/tools/$mod"
  [ -d "$moddir" ] || moddir="$here/$mod"
  local dest="$cache/$key" spec part lock_fd=""
  if ! all_built "$dest" "$@"; then
    mkdir -p "$cache"
    # One build per folder at a time: a second caller waits, then finds the binaries built.
    if command -v flock >/dev/null 2>&1; then
      exec {lock_fd}>"$dest.lock"
      flock "$lock_fd"
      rm -rf "$dest".partial.*  # left by an interrupted build (we hold the lock)
    fi
  fi
  if ! all_built "$dest" "$@"; then
    part="$(mktemp -d "$dest.partial.XXXXXX")"
    for spec in "$@"; do
      if [ -x "$dest/${spec%%=*}" ]; then
        cp -p "$dest/${spec%%=*}" "$part/"  # published earlier: reuse it
        continue
      fi
      echo "building ${spec%%=*} ($key), this takes a while on first use..." >&2
      (cd "$moddir" && CGO_ENABLED=0 go build -trimpath -tags selinux,notest \
        -ldflags "$ldflags" -o "$part/${spec%%=*}" "${spec#*=}")
    done
    # Publish the folder only once every binary in it is built, so an interrupted build
    # is never mistaken for a cached one.
    chmod 755 "$part"
    rm -rf "$dest" && mv "$part" "$dest"
  fi
  if [ -n "$lock_fd" ]; then exec {lock_fd}>&-; fi
  for spec in "$@"; do echo "${spec%%=*}=$dest/${spec%%=*}"; done
}

# all_built <folder> <out-name>=<package> ...: whether every binary is in the folder.
all_built() {
  local dest="$1" spec; shift
  for spec in "$@"; do [ -x "$dest/${spec%%=*}" ] || return 1; done
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
    kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler \
    kubectl=k8s.io/kubernetes/cmd/kubectl
}

# The node agents of the real-node e2e tier, from the same module (and version) as the control
# plane, in their own folder: the default targets (and `make test`) never build them.
build_node() {
  local v; v="$(pinned k8s k8s.io/kubernetes)"
  local minor="${v#v1.}"; minor="${minor%%.*}"
  local pkg=k8s.io/component-base/version
  local ld="-s -w -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ld="$ld -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  build k8s "kubernetes-node-$v" "$ld" \
    kubelet=k8s.io/kubernetes/cmd/kubelet \
    kube-proxy=k8s.io/kubernetes/cmd/kube-proxy
}

# The pod sandbox ("pause") binary: no upstream image can be pulled, so the e2e tier packs its
# own. Keyed by a hash of its source (it has no version).
build_pause() {
  local sum; sum="$(cat "$here/e2e/pause/go.mod" "$here/e2e/pause/main.go" | sha256sum)"
  build e2e/pause "pause-${sum:0:12}" "-s -w" pause=.
}

build_helm() {
  local v; v="$(pinned helm helm.sh/helm/v3)"
  build helm "helm-$v" "-s -w -X helm.sh/helm/v3/internal/version.version=$v" helm=helm.sh/helm/v3/cmd/helm
}

build_kwok() {
  local v; v="$(pinned kwok sigs.k8s.io/kwok)"
  build kwok "kwok-$v" "-s -w" kwok=sigs.k8s.io/kwok/cmd/kwok
}

targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(etcd k8s helm kwok)
for t in "${targets[@]}"; do
  case "$t" in
    etcd|k8s|helm|kwok|node|pause) "build_$t" ;;
    *) echo "error: unknown tool '$t' (expected etcd, k8s, helm, kwok, node or pause)" >&2; exit 2 ;;
  esac
done
