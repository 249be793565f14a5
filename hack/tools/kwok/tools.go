//go:build tools

// Package tools pins kwok (fake nodes and pods for the test control plane) built by
// hack/build-tools.sh.
package tools

import (
	_ "sigs.k8s.io/kwok/cmd/kwok"
)
