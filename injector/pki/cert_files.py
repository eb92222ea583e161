"""The serving certificate's files on disk, and the server's TLS context built from them.

Files are written atomically so a reader never sees half a key; a pair is
written key first, so a reload triggered by the certificate finds its key.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from injector.pki.authority import CertBundle


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path
    ca: Path

    def write(self, bundle: CertBundle) -> None:
        # Key before cert: a reload triggered by the cert then finds its key.
        write_atomic(self.ca, bundle.ca_pem, 0o644)
        write_atomic(self.key, bundle.key_pem)
        write_atomic(self.cert, bundle.cert_pem, 0o644)

    def exists(self) -> bool:
        return self.cert.is_file() and self.key.is_file()

    def stamp(self) -> tuple[float, float]:
        """Modification times, to notice when cert-manager (or we) replaced them."""
        return (self.cert.stat().st_mtime_ns, self.key.stat().st_mtime_ns)


def server_ssl_context(files: CertFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.cert, files.key)
    return context
