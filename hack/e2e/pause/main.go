// Command pause is the pod sandbox ("pause") container of the real-node end-to-end tier: it
// holds the pod's namespaces open, reaps the zombies it inherits as PID 1 of a shared PID
// namespace, and exits 0 on SIGINT or SIGTERM. It stands in for registry.k8s.io/pause, which
// cannot be pulled here; hack/e2e/images.sh packs the static binary into an OCI image.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
