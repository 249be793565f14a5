//go:build tools

// Package tools pins the Kubernetes commands built by hack/build-tools.sh: the control plane
// and kubectl (target k8s), and the node agents kubelet and kube-proxy (target node, for the
// real-node end-to-end tier only).
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
