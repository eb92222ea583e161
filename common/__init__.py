"""What the injector, the sidecar and the dev tooling share.

A leaf package: it imports neither `injector` nor `sidecar` (nor anything
above them). It holds the contract between the injector and the sidecar
(`common.env`: every environment variable's name, default and value rule),
logging set-up, and the one helper per host job: process groups, free ports
and mountinfo.
"""
