"""TLS and mTLS on the router's gRPC port and check port (``service.tls``), with certificate files
reloaded when they change.

The files are read once per change into bytes (``read_material``) and everything is built from
those bytes, so a certificate rotated in two steps (chain written, key not yet) can never pair an
old key with a new chain: a pair that does not match is refused, the last good one stays, and the
next check tries again. A change is seen by the files' identity and modification time (``stat``
follows symlinks: Kubernetes swaps a Secret volume's ``..data`` link atomically).

* gRPC: ``grpc.dynamic_ssl_server_credentials``, whose fetcher gRPC calls at each handshake: it
  hands over a new certificate configuration once per change, None otherwise (no I/O there).
* check server (asyncio): the listening context's ``sni_callback`` (called at every ClientHello,
  with or without SNI) points each new connection at the current ``ssl.SSLContext``; connections
  already open keep theirs.

Under mTLS (``client_ca``) both ports refuse a client without a certificate that CA signed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import tempfile
from dataclasses import dataclass
from typing import Iterator

from ..config import ConfigError, EnvoyTlsSettings, TlsSettings

log = logging.getLogger("extproc.service")
MAX_FILE = 1 << 20  # a certificate chain or key file larger than this is not one


@dataclass(frozen=True)
class TlsMaterial:
    """The PEM bytes the router serves with, checked to belong together."""

    cert: bytes
    key: bytes
    client_ca: bytes | None


def _read(path: str, field: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as exc:
        raise ConfigError(field, f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_FILE:
        raise ConfigError(field, f"{path} is larger than {MAX_FILE} bytes: not a PEM file")
    return data


@contextlib.contextmanager
def _as_file(data: bytes) -> Iterator[str]:
    """A path holding ``data`` for OpenSSL's file-only loaders: an anonymous memory file where the
    kernel has them (a key never lands on disk twice), else a private temporary file."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("extproc-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile(prefix=".extproc-tls-") as f:  # mode 0600
        f.write(data)
        f.flush()
        yield f.name


def _no_password() -> bytes:
    return b""  # never OpenSSL's terminal prompt: an encrypted key fails to load instead


def server_context(material: TlsMaterial) -> ssl.SSLContext:
    """The check server's context for this material (raises ssl.SSLError on bad material)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    with _as_file(material.cert) as cert, _as_file(material.key) as key:
        ctx.load_cert_chain(cert, key, password=_no_password)
    if material.client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=material.client_ca.decode("ascii", "replace"))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _pem_certs(data: bytes, field: str, path: str) -> None:
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(field, f"{path} holds no PEM certificate")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=data.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(field, f"{path} is not a readable PEM certificate: {exc}") from None


def read_material(tls: TlsSettings) -> TlsMaterial:
    """Read and check the files: they exist, parse, and the key matches the certificate. Raises
    ConfigError naming the field and the reason."""
    cert = _read(tls.cert, "service.tls.cert")
    _pem_certs(cert, "service.tls.cert", tls.cert)
    key = _read(tls.key, "service.tls.key")
    ca = None
    if tls.client_ca is not None:
        ca = _read(tls.client_ca, "service.tls.client_ca")
        _pem_certs(ca, "service.tls.client_ca", tls.client_ca)
    material = TlsMaterial(cert, key, ca)
    try:
        server_context(material)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise ConfigError("service.tls.key", f"{tls.key} is not the key of the certificate in {tls.cert}") from None
        raise ConfigError("service.tls.key", f"{tls.key} is not a readable, unencrypted PEM private key "
                          f"({exc.reason or exc})") from None
    return material


def _signature(tls: TlsSettings) -> tuple:
    out = []
    for path in (tls.cert, tls.key, tls.client_ca):
        if path is None:
            continue
        try:
            st = os.stat(path)
            out.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


class TlsFiles:
    """The router's TLS material, kept current: ``poll()`` (every ``reload_s``, on the event loop)
    rereads the files when they changed; both servers pick up what it installs for new
    connections. Raises ConfigError at construction when the files are not good."""

    def __init__(self, tls: TlsSettings, on_reload=None) -> None:
        self.tls = tls
        self._signature = _signature(tls)
        material = read_material(tls)
        # one attribute, replaced whole: gRPC's fetcher reads it from a C-core thread
        self.current: tuple[int, TlsMaterial, ssl.SSLContext] = (0, material, server_context(material))
        self._on_reload = on_reload or (lambda outcome: None)

    @property
    def mutual(self) -> bool:
        return self.tls.client_ca is not None

    def poll(self) -> str:
        """Reread the files if they changed: ``unchanged``, ``reloaded`` or ``invalid`` (the last
        good material stays until a further change of the files makes a good pair)."""
        signature = _signature(self.tls)
        if signature == self._signature:
            return "unchanged"
        self._signature = signature
        try:
            material = read_material(self.tls)
            context = server_context(material)
        except (ConfigError, ssl.SSLError) as exc:
            log.warning("TLS files not reloaded (the last good certificate stays): %s", exc)
            self._on_reload("invalid")
            return "invalid"
        generation, old, _ = self.current
        if material == old:
            return "unchanged"
        self.current = (generation + 1, material, context)
        log.info("TLS certificate reloaded from %s (generation %d)", self.tls.cert, generation + 1)
        self._on_reload("reloaded")
        return "reloaded"

    # -- gRPC --------------------------------------------------------------------------------------
    def grpc_credentials(self):
        """``grpc.ServerCredentials`` whose certificate follows ``poll``."""
        import grpc

        served = [0]

        def fetch():  # at each handshake, on a gRPC thread: no I/O, only a new config per change
            generation, material, _ = self.current
            if generation == served[0]:
                return None
            served[0] = generation
            return _grpc_config(material)

        return grpc.dynamic_ssl_server_credentials(_grpc_config(self.current[1]), fetch,
                                                   require_client_authentication=self.mutual)

    # -- the check server ------------------------------------------------------------------------------
    def check_context(self) -> ssl.SSLContext:
        """The listening context: each handshake is moved onto the current context."""
        listening = server_context(self.current[1])

        def pick(ssl_object, server_name, _context):
            ssl_object.context = self.current[2]
        listening.sni_callback = pick
        return listening


def _grpc_config(material: TlsMaterial):
    import grpc

    return grpc.ssl_server_certificate_configuration([(material.key, material.cert)], material.client_ca)


# -- clients (Envoy's side: the health check, the stack, tests) ---------------------------------------

def channel_credentials(envoy: EnvoyTlsSettings) -> tuple[object, list[tuple[str, str]]]:
    """gRPC credentials and channel options of a client that reaches the router as Envoy does.
    (grpc is imported where used: the command line imports this module for its arguments.)"""
    import grpc

    def read(path: str | None) -> bytes | None:
        return None if path is None else _read(path, "service.tls.envoy")
    creds = grpc.ssl_channel_credentials(read(envoy.ca), read(envoy.key), read(envoy.cert))
    options = [("grpc.ssl_target_name_override", envoy.server_name)] if envoy.server_name else []
    return creds, options


def add_client_arguments(parser) -> None:
    """``--ca``, ``--cert``, ``--key``, ``--server-name``: a command line client of a router serving
    TLS (the health check, ``extproc explain --server``); ``client_settings`` reads them back."""
    parser.add_argument("--ca", help="TLS (service.tls): the CA that signed the router's certificate")
    parser.add_argument("--cert", help="mTLS: a client certificate the router's client_ca signed ...")
    parser.add_argument("--key", help="... and its key")
    parser.add_argument("--server-name", help="TLS: the name the router's certificate carries "
                        "(default: the address' host)")


def client_settings(args, parser) -> EnvoyTlsSettings | None:
    if args.ca:
        if (args.cert is None) != (args.key is None):
            parser.error("--cert and --key go together")
        return EnvoyTlsSettings(ca=args.ca, cert=args.cert, key=args.key, server_name=args.server_name)
    if args.cert or args.key or args.server_name:
        parser.error("--cert, --key and --server-name need --ca")
    return None


def client_context(envoy: EnvoyTlsSettings) -> ssl.SSLContext:
    """An ``ssl`` client context that reaches the check port as Envoy does."""
    ctx = ssl.create_default_context(cafile=envoy.ca)
    if envoy.cert:
        ctx.load_cert_chain(envoy.cert, envoy.key)
    ctx.check_hostname = envoy.server_name is not None
    return ctx
