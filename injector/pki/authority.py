"""The certificate authority: a self-signed CA, the certificates it issues, and their checks.

The CA is long-lived because its certificate is the caBundle the apiserver
trusts; the serving certificate is short-lived and re-issued from the same CA
before it expires, so rotation never needs a caBundle change. Writing them
to disk is `cert_files.py`'s.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_LIFETIME = dt.timedelta(days=3650)
SERVING_LIFETIME = dt.timedelta(days=90)
# Re-issue once less than this fraction of the serving lifetime remains.
RENEW_FRACTION = 1 / 3


@dataclass(frozen=True)
class CertBundle:
    ca_pem: bytes
    ca_key_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(signs_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def generate_ca(common_name: str = "bento-juicefs-injector-ca") -> tuple[bytes, bytes]:
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def issue_cert(
    ca_pem: bytes,
    ca_key_pem: bytes,
    common_name: str,
    *,
    organizations: Sequence[str] = (),
    hosts: Sequence[str] = (),
    server: bool = False,
    client: bool = False,
    lifetime: dt.timedelta = SERVING_LIFETIME,
) -> tuple[bytes, bytes]:
    """A leaf certificate signed by the CA: (cert PEM, EC key PEM)."""
    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("CA key must be an EC key")
    key = _key()
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    usages = []
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def issue_serving_cert(
    ca_pem: bytes,
    ca_key_pem: bytes,
    hosts: Sequence[str],
    lifetime: dt.timedelta = SERVING_LIFETIME,
) -> tuple[bytes, bytes]:
    return issue_cert(ca_pem, ca_key_pem, hosts[0], hosts=hosts, server=True, lifetime=lifetime)


def generate_bundle(hosts: Sequence[str]) -> CertBundle:
    ca_pem, ca_key_pem = generate_ca()
    cert_pem, key_pem = issue_serving_cert(ca_pem, ca_key_pem, hosts)
    return CertBundle(ca_pem, ca_key_pem, cert_pem, key_pem)


def needs_renewal(cert_pem: bytes, now: dt.datetime | None = None) -> bool:
    """Less than RENEW_FRACTION of its lifetime left (or expired, or not yet valid)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    now = now or _now()
    if now < start:
        return True
    return end - now < (end - start) * RENEW_FRACTION


def not_after(cert_pem: bytes) -> dt.datetime:
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc


def _spki(public: ec.EllipticCurvePublicKey | object) -> bytes:
    if not isinstance(public, ec.EllipticCurvePublicKey):
        return b""
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def ca_problem(ca_pem: bytes, ca_key_pem: bytes, now: dt.datetime | None = None) -> str | None:
    """None when the pair is a usable CA; otherwise what is wrong with it.

    Usable: both parse, the key is the certificate's, the certificate may sign
    certificates, and it is not expired or close to it (RENEW_FRACTION).
    """
    try:
        cert = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        return "the CA certificate is not a PEM certificate"
    try:
        key = serialization.load_pem_private_key(ca_key_pem, password=None)
    except (ValueError, TypeError):
        return "the CA key is not an unencrypted PEM private key"
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return "the CA key is not an EC key"
    if _spki(key.public_key()) != _spki(cert.public_key()):
        return "the CA key does not belong to the CA certificate"
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return "the CA certificate has no basicConstraints"
    if not constraints.ca:
        return "the CA certificate is not a CA (basicConstraints ca=false)"
    if needs_renewal(ca_pem, now):
        return f"the CA certificate expires at {cert.not_valid_after_utc.isoformat()}"
    return None


def split_certificates(bundle: bytes) -> list[bytes]:
    """The PEM certificates of a bundle, each re-encoded; unparsable input gives []."""
    try:
        certs = x509.load_pem_x509_certificates(bundle)
    except ValueError:
        return []
    return [c.public_bytes(serialization.Encoding.PEM) for c in certs]


def valid_certificates(bundle: bytes, now: dt.datetime | None = None) -> list[bytes]:
    """The certificates of a bundle that are valid now, in order, without duplicates."""
    now = now or _now()
    kept: list[bytes] = []
    for pem in split_certificates(bundle):
        cert = x509.load_pem_x509_certificate(pem)
        if cert.not_valid_before_utc <= now < cert.not_valid_after_utc and pem not in kept:
            kept.append(pem)
    return kept


def service_hosts(service: str, namespace: str, extra: Sequence[str] = ()) -> list[str]:
    return [
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
        f"{service}.{namespace}",
        service,
        *extra,
    ]
