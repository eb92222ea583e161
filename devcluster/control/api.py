"""Just enough of the Kubernetes API over HTTPS, as the cluster admin, without a kubectl per call.

api = Api(cp)
api.call("GET", "/api/v1/namespaces/default/pods")
api.apply(path, body)   # server-side apply, forcing conflicts
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

from devcluster.control.plane import ControlPlane

FIELD_MANAGER = "devcluster-injector-ha"


class ApiError(OSError):
    """The apiserver refused a call; the message has its answer."""


class Api:
    """Just enough of the Kubernetes API, as the cluster admin, without a kubectl per call."""

    def __init__(self, cp: ControlPlane) -> None:
        self.server = cp.server
        self.context = ssl.create_default_context(cafile=str(cp.pki.ca.cert))
        admin = cp.pki.admin
        self.context.load_cert_chain(str(admin.cert), str(admin.key))

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.server + path, data=data, method=method, headers={"Content-Type": content_type}
        )
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:2000]
            raise ApiError(f"{method} {path}: {err.code} {detail}") from None

    def apply(self, path: str, body: dict[str, Any]) -> Any:
        """Server-side apply (JSON is YAML) with our field manager, forcing conflicts."""
        return self.call(
            "PATCH",
            f"{path}?fieldManager={FIELD_MANAGER}&force=true",
            body,
            content_type="application/apply-patch+yaml",
        )
