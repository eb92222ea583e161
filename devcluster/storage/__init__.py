"""The storage stack: MinIO, Redis, a JuiceFS volume, a shaped link, a slow disk."""
