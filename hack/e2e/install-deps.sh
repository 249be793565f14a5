#!/usr/bin/env bash
# Installs, from the OS packages (Debian/Ubuntu apt), what the real-node e2e tier runs besides
# the Go tools of hack/build-tools.sh: containerd and runc (the container runtime), the CNI
# plugins (bridge, host-local, loopback, portmap), iptables/nftables and conntrack (kube-proxy),
# and umoci and skopeo (OCI images built without Docker). Idempotent; needs root.
#
# Packages stay installed (like the Go toolchain); what a node run changes at run time is undone
# by its teardown (datamesh_dev.node). containerd is never started as a system service here: the
# e2e node runs its own containerd with its own config, socket and state directories.
set -euo pipefail

packages=(containerd runc containernetworking-plugins iptables nftables conntrack umoci skopeo)

if [ "$(id -u)" -ne 0 ]; then
  echo "error: the e2e tier needs root (it runs kubelet, containerd and iptables)" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: apt-get not found; install these packages yourself: ${packages[*]}" >&2
  exit 1
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "installing ${missing[*]}..." >&2
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d 101: no package may start a service (we run containerd ourselves).
policy=/usr/sbin/policy-rc.d
created_policy=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && created_policy=1
fi
trap '[ -z "$created_policy" ] || rm -f "$policy"' EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
