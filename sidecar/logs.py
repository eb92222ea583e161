"""JSON logs for the sidecar, like the injector's."""

from injector.logs import configure_logging

__all__ = ["configure_logging"]
