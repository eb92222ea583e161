//go:build tools

// Package tools pins the upstream main packages built by hack/build-binaries.sh.
package tools

import (
	_ "github.com/prometheus/prometheus/cmd/prometheus"
	_ "github.com/prometheus/prometheus/cmd/promtool"
)
