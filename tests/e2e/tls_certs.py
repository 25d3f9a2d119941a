"""Certificates made at test time (the ``cryptography`` package): a CA, a server certificate for
127.0.0.1/localhost and client certificates, written as PEM files."""

from __future__ import annotations

import datetime
import ipaddress
import pathlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAME = "extproc-router.test"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class CA:
    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def make(cls, name: str = "extproc test CA") -> "CA":
        key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return cls(name, key, cert)

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, server: bool) -> tuple[bytes, bytes, int]:
        """(certificate PEM, key PEM, serial) of a leaf: a server one for SERVER_NAME, localhost and
        127.0.0.1, or a client one."""
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        serial = x509.random_serial_number()
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(serial)
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                         else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName(SERVER_NAME), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), serial


@dataclass
class TlsDir:
    """PEM files in one directory: ca.crt, server.crt/.key (the router's), client.crt/.key (Envoy's)."""

    root: pathlib.Path
    ca: CA
    server_serial: int = 0

    @classmethod
    def make(cls, root: pathlib.Path) -> "TlsDir":
        root.mkdir(parents=True, exist_ok=True)
        out = cls(root, CA.make())
        (root / "ca.crt").write_bytes(out.ca.pem())
        out.rotate_server()
        cert, key, _ = out.ca.issue("envoy", server=False)
        (root / "client.crt").write_bytes(cert)
        (root / "client.key").write_bytes(key)
        return out

    def path(self, name: str) -> str:
        return str(self.root / name)

    def rotate_server(self) -> int:
        """A new server certificate and key from the same CA, each file replaced atomically; its serial."""
        cert, key, self.server_serial = self.ca.issue("extproc-router", server=True)
        for name, data in (("server.key", key), ("server.crt", cert)):
            tmp = self.root / f".{name}.tmp"
            tmp.write_bytes(data)
            tmp.replace(self.root / name)
        return self.server_serial

    def service_tls(self, mutual: bool, reload_s: float = 0.2) -> dict:
        """The ``service.tls`` block of a router config using these files."""
        doc = {"cert": self.path("server.crt"), "key": self.path("server.key"), "reload_s": reload_s,
               "envoy": {"ca": self.path("ca.crt"), "server_name": SERVER_NAME}}
        if mutual:
            doc["client_ca"] = self.path("ca.crt")
            doc["envoy"].update(cert=self.path("client.crt"), key=self.path("client.key"))
        return doc


def serial_of(pem_or_der: bytes) -> int:
    if pem_or_der.startswith(b"-----"):
        return x509.load_pem_x509_certificate(pem_or_der).serial_number
    return x509.load_der_x509_certificate(pem_or_der).serial_number
