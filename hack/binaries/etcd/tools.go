//go:build tools

// Package tools pins the upstream main package built by hack/build-binaries.sh.
// The etcd server's main package is the module root of go.etcd.io/etcd/server/v3.
package tools

import _ "go.etcd.io/etcd/server/v3"
