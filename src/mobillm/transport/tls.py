"""TLS for the gRPC transport: validated configs, gRPC credentials, and a certificate maker.

``TlsServerConfig`` with ``client_ca`` set requires mutual TLS (every device presents a
certificate signed by that CA). ``TlsClientConfig`` with no field set means a plaintext
channel, which the server only offers on loopback unless told ``--insecure``. ``make_certs``
writes a private CA, a server certificate for localhost/127.0.0.1 (plus any hosts asked for)
and optionally a client certificate: enough for tests and for a first deployment.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
from pathlib import Path

import grpc

from mobillm.config import Config, check

LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def _readable(path: str, what: str) -> None:
    check(Path(path).is_file(), f"{what}: file not found: {path}")


@dataclasses.dataclass(frozen=True)
class TlsServerConfig(Config):
    """Server certificate chain and key (PEM); ``client_ca`` set = clients must present certs."""

    cert: str
    key: str
    client_ca: str = ""

    def validate(self) -> None:
        check(bool(self.cert) and bool(self.key), "TLS server needs both --tls-cert and --tls-key")
        _readable(self.cert, "TlsServerConfig.cert")
        _readable(self.key, "TlsServerConfig.key")
        if self.client_ca:
            _readable(self.client_ca, "TlsServerConfig.client_ca")


@dataclasses.dataclass(frozen=True)
class TlsClientConfig(Config):
    """CA that signed the server's certificate, and a client cert + key for mutual TLS.

    All empty = plaintext. ``cert`` without ``ca`` trusts gRPC's default root certificates.
    """

    ca: str = ""
    cert: str = ""
    key: str = ""

    def validate(self) -> None:
        check(
            bool(self.cert) == bool(self.key),
            "TLS client: give both a client certificate and its key, or neither",
        )
        for name in ("ca", "cert", "key"):
            if getattr(self, name):
                _readable(getattr(self, name), f"TlsClientConfig.{name}")

    @property
    def enabled(self) -> bool:
        return bool(self.ca or self.cert)


def server_credentials(cfg: TlsServerConfig) -> grpc.ServerCredentials:
    """gRPC server credentials; with ``client_ca`` the handshake demands a client certificate."""
    ca = Path(cfg.client_ca).read_bytes() if cfg.client_ca else None
    pair = (Path(cfg.key).read_bytes(), Path(cfg.cert).read_bytes())
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=bool(ca))


def channel_credentials(cfg: TlsClientConfig) -> grpc.ChannelCredentials:
    """gRPC channel credentials for ``cfg`` (which must be ``enabled``)."""

    def read(p: str) -> bytes | None:
        return Path(p).read_bytes() if p else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(cfg.ca),
        private_key=read(cfg.key),
        certificate_chain=read(cfg.cert),
    )


def is_loopback(host: str) -> bool:
    """True for localhost names and loopback addresses (127.0.0.0/8, ::1)."""
    h = host.strip("[]").lower()
    if h in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


# --- certificate maker ----------------------------------------------------------------------
def make_certs(
    out_dir: str | Path,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
    client: bool = True,
    days: int = 365,
) -> dict[str, str]:
    """Write a self-signed CA, a server certificate for ``hosts`` and optionally a client one.

    Returns the paths by role: ``ca``, ``ca_key``, ``cert`` and ``key`` (the server's), and
    ``client_cert``, ``client_key`` when ``client``. Keys are ECDSA P-256 PEM, mode 0600.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MobiLLM"),
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
            ]
        )

    def write_key(key: ec.EllipticCurvePrivateKey, fname: str) -> str:
        path = out / fname
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return str(path)

    def write_cert(cert: x509.Certificate, fname: str) -> str:
        (out / fname).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return str(out / fname)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("MobiLLM CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate clock skew
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]) -> tuple:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(ca_key, hashes.SHA256()), key

    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h.strip("[]"))))
        except ValueError:
            sans.append(x509.DNSName(h))
    server_cert, server_key = leaf(hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, sans)
    files = {
        "ca": write_cert(ca_cert, "ca.pem"),
        "ca_key": write_key(ca_key, "ca.key"),
        "cert": write_cert(server_cert, "server.pem"),
        "key": write_key(server_key, "server.key"),
    }
    if client:
        client_cert, client_key = leaf("mobillm-device", ExtendedKeyUsageOID.CLIENT_AUTH, [])
        files["client_cert"] = write_cert(client_cert, "client.pem")
        files["client_key"] = write_key(client_key, "client.key")
    return files
