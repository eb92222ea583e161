"""One injector replica as a local process, listed in an EndpointSlice of its own.

What `HaInjectors` (devcluster.installs.injector_ha) starts, probes and
stops: its address, config and certificate directory, whether /readyz
answers, and what it logged since it last started.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devcluster.installs.injector_install import SERVICE


@dataclass
class Replica:
    index: int
    host: str
    port: int
    dir: Path
    log_file: Path
    process: subprocess.Popen[bytes] | None = None
    # Where the log stood when this replica last started (to read only what came after).
    log_offset: int = 0
    endpoint: tuple[bool, bool, bool] | None = None  # ready, serving, terminating as listed
    terminating: bool = False

    @property
    def name(self) -> str:
        return f"injector-{self.index}"

    @property
    def config_file(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def cert_dir(self) -> Path:
        return self.dir / "certs"

    @property
    def slice_name(self) -> str:
        return f"{SERVICE}-local-{self.index}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.running() and self.process is not None else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ready(self) -> bool:
        ca = self.cert_dir / "ca.crt"
        if not self.running() or not ca.exists():
            return False
        try:
            context = ssl.create_default_context(cafile=str(ca))
            url = f"https://{self.host}:{self.port}/readyz"
            with urllib.request.urlopen(url, context=context, timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError, ssl.SSLError):
            return False

    def log(self) -> str:
        """What this replica logged since it last started."""
        try:
            with self.log_file.open("rb") as handle:
                handle.seek(self.log_offset)
                return handle.read().decode(errors="replace")
        except OSError:
            return ""

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log().splitlines():
            if f'"{name}"' in line:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("event") == name:
                    found.append(entry)
        return found
