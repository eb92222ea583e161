//go:build tools

// Package tools pins the upstream containerd main packages built by
// hack/build-binaries.sh (containerd, the runc v2 shim, ctr).
package tools

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
)
