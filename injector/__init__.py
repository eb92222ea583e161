"""Mutating admission webhook that streams BentoML models from JuiceFS."""

__version__ = "0.1.0"
