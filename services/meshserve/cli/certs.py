"""`meshserve certs`: a development CA and one key and certificate per service identity, for mutual TLS.

Each service certificate names its identity twice: as its subject's common name and as a DNS name
(`router`), which is what the mesh checks on both ends (common/tls.py). Its other names are where it may be
reached: localhost, 127.0.0.1, ::1 and the chart's Service names, so that the gateway's certificate also
serves TLS at the edge. Run again on the same folder, it keeps the CA and issues new service certificates:
that is a rotation, which running services pick up without a restart.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshserve.common.tls import ROLES, role_files

CA_NAME = "meshserve development CA"
LOOPBACK_NAMES = ["localhost"]
LOOPBACK_IPS = ["127.0.0.1", "::1"]


def chart_dns_names(role: str, fullname: str, namespace: str) -> list[str]:
    """The names the chart's Service of `role` has inside the cluster (templates/services.yaml)."""
    service = f"{fullname}-{role}"
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"]


def write_certs(
    directory: Path,
    *,
    fullname: str = "meshserve",
    namespace: str = "default",
    extra_names: tuple[str, ...] = (),
    days: int = 365,
) -> list[Path]:
    """Writes ca.crt/ca.key (kept when present) and ROLE.crt/ROLE.key for every identity; returns the files."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _load_or_make_ca(directory, days)
    written = [directory / "ca.crt"]
    for role in ROLES:
        names = [role, *LOOPBACK_NAMES, *chart_dns_names(role, fullname, namespace), *extra_names]
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _sign(
            ca_key,
            ca_cert,
            key.public_key(),
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, role)]),
            days,
            ca=False,
            names=list(dict.fromkeys(names)),
        )
        paths = role_files(directory, role)
        _write_key(paths.key, key)
        _replace(paths.cert, cert.public_bytes(serialization.Encoding.PEM))
        written += [paths.cert, paths.key]
    return written


def _load_or_make_ca(directory: Path, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path, cert_path = directory / "ca.key", directory / "ca.crt"
    if key_path.exists() and cert_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey), f"{key_path} is not an EC key"
        return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    # The CA outlives the service certificates it signs several times over, so they can be re-issued under it.
    cert = _sign(key, None, key.public_key(), name, days * 10, ca=True, names=[])
    _write_key(key_path, key)
    _replace(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _sign(
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    public_key: ec.EllipticCurvePublicKey,
    subject: x509.Name,
    days: int,
    *,
    ca: bool,
    names: list[str],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerates a little clock skew
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        builder = builder.add_extension(usage, critical=True)
    else:
        assert issuer is not None
        usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
            builder.add_extension(usage, critical=True)
            # Every identity both serves and calls: server and client authentication.
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(a)) for a in LOOPBACK_IPS]
                ),
                critical=False,
            )
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _replace(path, pem, mode=0o600)


def _replace(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Atomically, so that a service reloading its files never reads half of one."""
    partial = path.with_name(f".{path.name}.tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(partial, mode)
    partial.replace(path)
