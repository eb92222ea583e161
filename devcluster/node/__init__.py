"""The real node: containerd, the kubelet and kube-proxy in namespaces of their own."""
