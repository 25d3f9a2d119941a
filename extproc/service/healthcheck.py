"""``python -m extproc.service.healthcheck``: exit 0 when the router's gRPC health service says
SERVING, 1 otherwise. The container image's HEALTHCHECK and docker-compose run it: the same check
Envoy's cluster health check and Kubernetes' gRPC probes make, from inside the container, with no
curl or grpc_health_probe binary in the image.

The address is ``--address``, else the port of ``EXTPROC_SERVICE__GRPC_ADDRESS`` (the image sets
it) on 127.0.0.1, else the built-in default.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..config import EnvoyTlsSettings, ServiceSettings

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"


def default_address(environ: dict[str, str] | None = None) -> str:
    """Where the router listens, seen from inside its own container: loopback, its gRPC port."""
    env = os.environ if environ is None else environ
    configured = env.get("EXTPROC_SERVICE__GRPC_ADDRESS") or ServiceSettings().grpc_address
    return f"127.0.0.1:{configured.rpartition(':')[2]}"


def check(address: str, timeout_s: float = 2.0, tls: EnvoyTlsSettings | None = None, raises: bool = False) -> bool:
    """Whether the router at ``address`` reports its ext_proc service SERVING (False when draining,
    down or not answering in time; ``raises``: the RpcError instead). ``tls``: reach it over TLS
    as Envoy does (service.tls.envoy)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls is not None:
        from .tls import channel_credentials

        creds, options = channel_credentials(tls)
        channel = grpc.secure_channel(address, creds, options=options)
    else:
        channel = grpc.insecure_channel(address)
    try:
        with channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout_s)
    except grpc.RpcError:
        if raises:
            raise
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    from .tls import add_client_arguments, client_settings

    parser = argparse.ArgumentParser(prog="python -m extproc.service.healthcheck", description=__doc__)
    parser.add_argument("--address", help="host:port of the router's gRPC service")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    add_client_arguments(parser)
    args = parser.parse_args(argv)
    address = args.address or default_address()
    healthy = check(address, args.timeout, client_settings(args, parser))
    print(f"router at {address}: {'SERVING' if healthy else 'not serving'}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
