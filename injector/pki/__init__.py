"""The webhook's certificates: issued, served, shared by replicas, trusted by the apiserver."""
