"""``serve-engine``: run one simulated vLLM instance."""

from __future__ import annotations

import argparse
import logging

from aiohttp import web

from extproc.engine.requests import OutputPolicy
from extproc.engine.server import EngineConfig, create_app
from extproc.fleet.instance import PROFILES, profile_named


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument("--profile", default="short", choices=sorted(PROFILES),
                        help="built-in GPU instance profile from extproc.fleet.instance (default: %(default)s)")
    parser.add_argument("--model", default=None,
                        help="served model name; its tokenizer family sets prompt counts "
                             "(default: the profile's model)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context window in tokens (default: the profile's)")
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="sequences running at once; the rest wait (default: the profile's)")
    parser.add_argument("--kv-capacity-tokens", type=int, default=None,
                        help="KV-cache size in tokens (default: the profile's)")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="multiply every simulated delay; 0 = no delays (default: %(default)s)")
    parser.add_argument("--output-tokens", default="256",
                        help="tokens generated when a request sets no max_tokens: N (at most N, capped "
                             "by the window) or 'max' (run to the window) (default: %(default)s)")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("serve-engine", help="run a simulated vLLM instance (OpenAI API)",
                                   description=__doc__)
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Raises ValueError for an inconsistent configuration (e.g. a window larger than the KV cache)."""
    overrides = {k: v for k, v in (("max_model_len", args.max_model_len),
                                   ("max_num_seqs", args.max_num_seqs),
                                   ("kv_capacity_tokens", args.kv_capacity_tokens)) if v is not None}
    profile = profile_named(args.profile)
    if overrides:
        profile = profile.with_overrides(**overrides)
    if args.time_scale < 0:
        raise ValueError("--time-scale must be >= 0")
    return EngineConfig(profile=profile, model=args.model, time_scale=args.time_scale,
                        output_policy=OutputPolicy.parse(args.output_tokens))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        logging.getLogger(__name__).error("%s", exc)
        return 2
    p = config.profile
    print(f"simulated vLLM: model={config.served_model} profile={p.name} max_model_len={p.max_model_len} "
          f"max_num_seqs={p.max_num_seqs} kv_capacity_tokens={p.kv_capacity_tokens} "
          f"time_scale={config.time_scale}", flush=True)
    web.run_app(create_app(config), host=args.host, port=args.port, access_log=None,
                print=lambda msg: print(msg, flush=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m extproc.engine", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
