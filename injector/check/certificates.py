"""Certificates as the apiserver judges them: parsed from PEM, described, verified.

`verify_served` is the apiserver's own test of a webhook's serving
certificate: a chain from the leaf to a root of the caBundle, valid now, for
the name it calls.
"""

from __future__ import annotations

import datetime as dt
import ipaddress

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError


def load_certificates(pem: bytes) -> list[x509.Certificate]:
    """The PEM certificates in pem, in order; [] when it holds none or is not PEM."""
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


def describe(cert: x509.Certificate) -> str:
    subject = cert.subject.rfc4514_string() or "(no subject)"
    return f"{subject}, expires {cert.not_valid_after_utc:%Y-%m-%d}"


def valid_at(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now < cert.not_valid_after_utc


def same_certificate(a: x509.Certificate, b: x509.Certificate) -> bool:
    """The same CA: subject and public key (a re-encoded copy is still the same CA)."""
    return a.subject == b.subject and a.public_key() == b.public_key()


def verify_served(
    leaf_pem: bytes, bundle_pem: bytes, server_name: str, now: dt.datetime
) -> str | None:
    """None when the caBundle verifies this serving certificate for server_name; else why not.

    The chain is built from the leaf to a certificate of the bundle (the
    bundle's certificates are the roots, as the apiserver uses them).
    """
    leaves = load_certificates(leaf_pem)
    if not leaves:
        return "the serving certificate is not a PEM certificate"
    roots = load_certificates(bundle_pem)
    if not roots:
        return "the caBundle holds no certificate"
    leaf, *intermediates = leaves
    issuers = {c.subject for c in [*roots, *intermediates]}
    if leaf.issuer not in issuers:
        held = "; ".join(sorted({r.subject.rfc4514_string() for r in roots}))
        return f"it is issued by {leaf.issuer.rfc4514_string()}, and the caBundle holds {held}"
    try:
        subject: x509.verification.Subject = x509.IPAddress(ipaddress.ip_address(server_name))
    except ValueError:
        subject = x509.DNSName(server_name)
    verifier = PolicyBuilder().store(Store(roots)).time(now).build_server_verifier(subject)
    try:
        verifier.verify(leaf, intermediates)
    except VerificationError as err:
        return str(err).split(" (encountered processing")[0]
    return None
