"""``extproc`` command line: explain routing decisions, check a config, run the simulated engine."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from .config import ConfigError, default_snapshot_path, load_config
from .samples import long_requests, request_rows


def _config(path: str | None, default_snapshot: str | None = None):
    """The validated config, or exit 2 with the field and the reason."""
    try:
        return load_config(path, default_snapshot=default_snapshot)
    except ConfigError as exc:
        print(f"invalid config: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _explain_requests(rows: list[dict]) -> list[tuple[bytes, str, object]]:
    """(raw body, path, parsed body) for each row, as a client would send it."""
    out = []
    for row in rows:
        body = row["body"]
        raw = json.dumps(body, ensure_ascii=False).encode() if not isinstance(body, str) else body.encode()
        path = row.get("path") or ("/v1/completions" if isinstance(body, dict) and "prompt" in body
                                   else "/v1/chat/completions")
        out.append((raw, path, body))
    return out


def cmd_explain(args: argparse.Namespace) -> int:
    import grpc

    from .explain import LocalExplainer, RemoteExplainer, calibration_keys, explain_all, format_explained

    if not args.server and (args.ca or args.cert or args.key or args.server_name):
        print("--ca, --cert, --key and --server-name are for --server (a router serving TLS)", file=sys.stderr)
        return 2
    if args.server and (args.config or args.calibration or args.no_learn):
        print("--server explains with the running router's config and calibration, and never learns: "
              "--config, --calibration and --no-learn apply to a local router only", file=sys.stderr)
        return 2
    rows, label = request_rows(args.files)
    requests = _explain_requests((rows[: args.limit] + long_requests(rows))[: args.limit])
    if args.server:
        from .service.tls import client_settings

        explainer = RemoteExplainer(args.server, client_settings(args, args.parser))
    else:
        snapshot = None
        if args.calibration:
            try:
                snapshot = pathlib.Path(args.calibration).read_bytes()
            except OSError as exc:
                print(f"cannot read {args.calibration}: {exc.strerror}", file=sys.stderr)
                return 2
        config = _config(args.config)
        try:
            explainer = LocalExplainer(config, learn=not args.no_learn, snapshot=snapshot)
        except ValueError as exc:  # the snapshot: validated as the router does at start
            print(f"{args.calibration}: {exc}", file=sys.stderr)
            return 2
    try:
        explained = explain_all(explainer, requests)
        calibration = {} if args.json else explainer.calibration(calibration_keys(explained))
    except grpc.RpcError as exc:  # a router that cannot be reached, or answers an error: say so, no traceback
        print(f"cannot explain with {explainer.origin}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    finally:
        explainer.close()
    for line in format_explained(explained, label, explainer.origin, calibration, as_json=args.json):
        print(line)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _config(args.config)
    tls = cfg.service.tls
    if tls is not None:  # the files, as `serve` reads them at start (on this machine)
        from .service.tls import read_material

        try:
            read_material(tls)
        except ConfigError as exc:
            print(f"invalid config: {exc}", file=sys.stderr)
            return 2
    b = cfg.budget
    print(f"config OK ({cfg.source})")
    if tls is not None:
        print(f"TLS: {'mTLS' if tls.client_ca else 'TLS'} with {tls.cert} (files read and checked)")
    print("pools: " + ", ".join(f"{p.name}={p.max_context}" for p in b.pools))
    print(f"estimator: {b.estimator} {b.estimator_settings or ''}".rstrip())
    print(f"default output reserve: {b.default_output_tokens}; media tokens: {b.media_tokens}")
    return 0


def _log_level(text: str) -> str:
    """A logging level in any case (info, INFO, Warning); anything else exits 2 naming the choices."""
    from .service.app import LOG_LEVELS

    if text.lower() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"unknown level {text!r} (choose from {', '.join(LOG_LEVELS)})")
    return text.lower()


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from .service.app import install_event_loop, run, setup_logging

    setup_logging(args.log_level)
    install_event_loop()
    # a bare serve keeps what it learned across restarts (the file or EXTPROC_SERVICE__SNAPSHOT_PATH
    # may say otherwise, `none` among them); configs built elsewhere (tests, the library) get none
    snapshot = default_snapshot_path()
    config = _config(args.config, snapshot)
    try:
        asyncio.run(run(config, args.config, lambda: load_config(args.config, default_snapshot=snapshot)))
    except ConfigError as exc:  # the TLS files, read at start
        print(f"invalid config: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. an address already in use: say so, no traceback
        print(f"cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_envoy_config(args: argparse.Namespace) -> int:
    from .service.envoy_config import layout_from_config, render_yaml

    config = _config(args.config)
    try:
        layout = layout_from_config(config, listen_port=args.listen_port, admin_port=args.admin_port,
                                    upstreams=args.upstream, listen_address=args.listen_address, router=args.router,
                                    router_http=args.router_http, admin_address=args.admin_address)
    except ConfigError as exc:  # the config lacks what Envoy needs (service.tls.envoy)
        print(f"invalid config: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"invalid arguments: {exc}", file=sys.stderr)
        return 2
    text = render_yaml(layout)
    if args.output:
        pathlib.Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_deploy_manifests(args: argparse.Namespace) -> int:
    from .service.manifests import write_all

    root = pathlib.Path(args.root)
    stale = write_all(root, check=args.check)
    for rel in stale:
        print(f"{'differs' if args.check else 'wrote'}: {rel}")
    return 1 if args.check and stale else 0


def cmd_up(args: argparse.Namespace) -> int:
    from .demo import up

    _config(args.config)  # fail here, naming the field, before starting anything
    ports = {"listen": args.port, "admin": args.admin_port, "grpc": args.grpc_port, "http": args.http_port,
             "metrics": args.metrics_port}
    return up(args.config, demo=args.demo, exit_after=args.exit, time_scale=args.time_scale, workdir=args.workdir,
              ports=ports)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extproc", description="Token-budget pool router for LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("explain", help="route request bodies and show each decision and how calibration moves")
    p.add_argument("files", nargs="*", help="JSONL files of request bodies or {body: …} rows "
                   "(default: ../shared/data/requests, else a bundled sample)")
    p.add_argument("--config", help="YAML config (default: built-in defaults)")
    p.add_argument("--limit", type=int, default=40, help="at most this many rows: requests from the files, then long ones stacked from them")
    p.add_argument("--server", metavar="HOST:PORT", help="ask a running router (its service.grpc_address) "
                   "through the operator API instead of a local router; it does not learn from these")
    p.add_argument("--no-learn", action="store_true", help="the local router does not learn from the true "
                   "counts as it goes (what --server does)")
    p.add_argument("--calibration", metavar="SNAPSHOT", help="start the local router from this calibration "
                   "snapshot (a file service.snapshot_path wrote, or GetCalibration's snapshot_json)")
    p.add_argument("--json", action="store_true", help="one JSON object per request with every number")
    from .service.tls import add_client_arguments

    add_client_arguments(p)  # --server over TLS
    p.set_defaults(func=cmd_explain, parser=p)
    p = sub.add_parser("check-config", help="validate a config file (and EXTPROC_* overrides)")
    p.add_argument("config", nargs="?", help="YAML config (default: built-in defaults)")
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("serve", help="run the ext_proc gRPC service Envoy consults")
    p.add_argument("--config", help="YAML config (default: built-in defaults; EXTPROC_* overrides apply)")
    p.add_argument("--log-level", default="info", type=_log_level, metavar="LEVEL",
                   help="debug, info, warning, error or critical, in any case (default: info)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("up", help="start Envoy, the router and simulated pools on loopback; Ctrl-C stops")
    p.add_argument("--config", help="router YAML config (default: built-in defaults)")
    p.add_argument("--demo", action="store_true", help="replay sample requests through the stack and report")
    p.add_argument("--exit", action="store_true", help="stop after the demo instead of serving")
    p.add_argument("--time-scale", type=float, default=0.01,
                   help="scale of simulated GPU delays (1.0 = the A100 profile's real speed)")
    p.add_argument("--workdir", help="where configs and logs go (default: a new temp dir)")
    for flag, default, what in (("--port", 10000, "Envoy's listener"), ("--admin-port", 9901, "Envoy's admin"),
                                ("--grpc-port", 50051, "the router's gRPC service"),
                                ("--http-port", 50052, "the router's ext_authz check endpoint"),
                                ("--metrics-port", 9464, "the router's metrics")):
        p.add_argument(flag, type=int, metavar="PORT",
                       help=f"port of {what} on 127.0.0.1 (default {default}; 0: any free port; "
                            "one in use is replaced by a free one, and the run says so)")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("envoy-config", help="render the Envoy bootstrap for this config")
    p.add_argument("--config", help="YAML config (default: built-in defaults)")
    p.add_argument("--listen-address", default="127.0.0.1", help="address Envoy listens on")
    p.add_argument("--listen-port", type=int, default=10000)
    p.add_argument("--router", help="host:port of the router's gRPC service (default: service.grpc_address)")
    p.add_argument("--router-http", help="host:port of the router's ext_authz check endpoint "
                   "(default: service.http_address)")
    p.add_argument("--admin-port", type=int, default=9901)
    p.add_argument("--admin-address", default="127.0.0.1",
                   help="address of Envoy's admin endpoint (stats); 0.0.0.0 only inside a private network")
    p.add_argument("--upstream", action="append", default=[], metavar="POOL=HOST:PORT",
                   help="address of a pool's vLLM service (default: 127.0.0.1:8001, 8002, … in pool order)")
    p.add_argument("-o", "--output", help="write here instead of stdout")
    p.set_defaults(func=cmd_envoy_config)
    p = sub.add_parser("deploy-manifests", help="render the compose Envoy config, Istio, Envoy Gateway, Inference Extension and "
                       "Kubernetes files from config/router.yaml")
    p.add_argument("--root", default=".", help="the repository checkout (default: the current directory)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a committed file differs")
    p.set_defaults(func=cmd_deploy_manifests)
    from .engine.cli import register as register_engine
    from .fleet.cli import register as register_fleet

    register_engine(sub)
    register_fleet(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
