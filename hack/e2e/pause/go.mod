module datamesh.io/hack/e2e/pause

go 1.24
