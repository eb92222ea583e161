"""The juicefs-mount sidecar: mount, warm the model into the local cache, open the gate."""

__version__ = "0.1.0"
