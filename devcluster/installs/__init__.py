"""The injector and the node agent installed on the local cluster: by Helm or kustomize as
pods, as a local process, as several replicas behind the Service; the node agent DaemonSet."""
