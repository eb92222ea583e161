"""The model store: a Bento's models on a JuiceFS volume, mounted, streamed, verified, cached.

One library under both the sidecar (a pod's own models) and the node agent
(a node's cache): the manifest and the volume's layout, `juicefs mount` of
one Bento driven by one narrow `MountSpec`, reading every byte against the
manifest, where the bytes came from, and publishing a Bento.
"""
