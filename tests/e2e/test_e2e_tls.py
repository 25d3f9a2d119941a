"""TLS and mTLS between the real Envoy and a real router process (``service.tls``), with
certificates made at test time: requests routed over TLS (ext_proc stream) and mTLS (ext_authz
check and the access-log stream); under mTLS a client without a certificate refused on both
ports; a rotated certificate served without a restart; bad files refused at start with the field."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time

import pytest
import yaml
from e2e_helpers import access_line, chat_body, metric, post, real_text, rid
from tls_certs import SERVER_NAME, TlsDir, serial_of

from extproc.config import EnvoyTlsSettings
from extproc.service.healthcheck import check as grpc_serving
from extproc.service.tls import client_context
from extproc.stack import envoy_counter, free_port


def _check_port_answer(port: int, ctx: ssl.SSLContext) -> tuple[int, bytes]:
    """(serial of the certificate served, the answer to GET /healthz) on the check port."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as conn:
            serial = serial_of(conn.getpeercert(binary_form=True))
            conn.sendall(b"GET /healthz HTTP/1.1\r\nhost: router\r\n\r\n")
            return serial, conn.recv(200)


def _grpc_port_serial(port: int, tls: EnvoyTlsSettings) -> int:
    ctx = client_context(tls)
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as conn:
            return serial_of(conn.getpeercert(binary_form=True))


def _routed_both_ways(stack) -> None:
    short, long = rid("tls-short"), rid("tls-long")
    assert post(stack, chat_body("hi", max_tokens=8), short).status == 200
    assert post(stack, chat_body(real_text(12_000), max_tokens=64), long).status == 200
    assert access_line(stack, short).served_by == "short"  # decided by the router: long is the default route
    assert access_line(stack, long).served_by == "long"


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> TlsDir:
    return TlsDir.make(tmp_path_factory.mktemp("tls"))


def test_envoy_routes_through_a_tls_router(make_stack, certs):
    stack = make_stack("tls", {"service": {"routing_filter": "ext_proc", "tls": certs.service_tls(mutual=False)}})
    _routed_both_ways(stack)
    assert envoy_counter(stack.admin_port, "cluster.extproc.ssl.handshake") >= 1
    # server-side TLS only: a client without a certificate is served, a plaintext one is not
    assert grpc_serving(f"127.0.0.1:{stack.grpc_port}", 2.0, EnvoyTlsSettings(ca=certs.path("ca.crt"),
                                                                                 server_name=SERVER_NAME))
    assert not grpc_serving(f"127.0.0.1:{stack.grpc_port}", 2.0)


def test_mtls_routes_refuses_clients_without_a_certificate_and_rotates(make_stack, certs):
    stack = make_stack("mtls", {"service": {"tls": certs.service_tls(mutual=True)}})  # ext_authz check
    _routed_both_ways(stack)
    for cluster in ("extproc", "extproc_http"):
        assert envoy_counter(stack.admin_port, f"cluster.{cluster}.ssl.handshake") >= 1, cluster
    envoy_side = stack.config.service.tls.envoy
    no_cert = EnvoyTlsSettings(ca=envoy_side.ca, server_name=SERVER_NAME)

    # refused without a client certificate, on both ports; served with Envoy's
    assert grpc_serving(f"127.0.0.1:{stack.grpc_port}", 2.0, envoy_side)
    probe = [sys.executable, "-m", "extproc.service.healthcheck", "--address", f"127.0.0.1:{stack.grpc_port}",
             "--ca", envoy_side.ca, "--server-name", SERVER_NAME]
    assert subprocess.run(probe + ["--cert", envoy_side.cert, "--key", envoy_side.key], timeout=30).returncode == 0
    assert subprocess.run(probe, capture_output=True, timeout=30).returncode == 1
    explained = subprocess.run([sys.executable, "-m", "extproc", "explain", "--limit", "1", "--json", "--server",
                                f"127.0.0.1:{stack.grpc_port}", *probe[5:], "--cert", envoy_side.cert, "--key",
                                envoy_side.key], capture_output=True, text=True, timeout=60)
    assert explained.returncode == 0 and '"pool"' in explained.stdout, explained.stderr[-2000:]
    assert not grpc_serving(f"127.0.0.1:{stack.grpc_port}", 2.0, no_cert)
    assert _check_port_answer(stack.http_port, client_context(envoy_side))[1].startswith(b"HTTP/1.1 200")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        answer = _check_port_answer(stack.http_port, client_context(no_cert))[1]
        assert not answer, answer  # TLS 1.3: the refusal can come as the first read instead
        raise ConnectionError("closed without an answer")

    # rotation: a new certificate on both ports, same process, Envoy still routing through it
    pid = stack.procs["router"].pid
    old = certs.server_serial
    assert _grpc_port_serial(stack.grpc_port, envoy_side) == old
    new = certs.rotate_server()
    deadline = time.monotonic() + 10
    while _check_port_answer(stack.http_port, client_context(envoy_side))[0] != new:
        assert time.monotonic() < deadline, "the check port still serves the old certificate after 10 s"
        time.sleep(0.1)
    assert _grpc_port_serial(stack.grpc_port, envoy_side) == new
    assert stack.procs["router"].pid == pid and stack.procs["router"].poll() is None
    assert metric(stack, "extproc_tls_reloads_total", outcome="reloaded") >= 1
    _routed_both_ways(stack)


def _serve_refused(tmp_path, tls: dict) -> str:
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump({"service": {
        "grpc_address": f"127.0.0.1:{free_port()}", "http_address": f"127.0.0.1:{free_port()}",
        "metrics_address": f"127.0.0.1:{free_port()}", "snapshot_path": "none", "tls": tls}}))
    proc = subprocess.run([sys.executable, "-m", "extproc", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    return proc.stderr


def test_bad_tls_files_fail_the_start_naming_the_field(tmp_path, certs):
    good = certs.service_tls(mutual=True)
    err = _serve_refused(tmp_path, {**good, "key": certs.path("client.key")})  # another certificate's key
    assert "service.tls.key" in err and "is not the key of the certificate" in err, err
    err = _serve_refused(tmp_path, {**good, "cert": str(tmp_path / "missing.crt")})
    assert "service.tls.cert" in err and "cannot read" in err, err
    (tmp_path / "not-a-ca.pem").write_text("hello")
    err = _serve_refused(tmp_path, {**good, "client_ca": str(tmp_path / "not-a-ca.pem")})
    assert "service.tls.client_ca" in err and "no PEM certificate" in err, err


def test_check_config_reads_the_tls_files_as_serve_does(tmp_path, certs):
    config = tmp_path / "router.yaml"
    for tls, code, said in ((certs.service_tls(mutual=True), 0, "TLS: mTLS with"),
                            ({**certs.service_tls(mutual=True), "key": certs.path("client.key")}, 2,
                             "service.tls.key")):
        config.write_text(yaml.safe_dump({"service": {"tls": tls}}))
        proc = subprocess.run([sys.executable, "-m", "extproc", "check-config", str(config)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == code and said in proc.stdout + proc.stderr, proc.stdout + proc.stderr
