"""The control plane: etcd, kube-apiserver, controller-manager, scheduler, their PKI."""
