"""``serve-engine``: run one simulated vLLM instance."""

from __future__ import annotations

import argparse
import logging

from aiohttp import web

from extproc.engine.requests import OutputPolicy
from extproc.engine.server import DEFAULT_MAX_BODY_BYTES, EngineConfig, create_app
from extproc.engine.versions import VllmVersion
from extproc.fleet.instance import PROFILES, profile_named


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument("--profile", default="short", choices=sorted(PROFILES),
                        help="built-in GPU instance profile from extproc.fleet.instance (default: %(default)s)")
    parser.add_argument("--model", default=None,
                        help="the model; also its served name unless --served-model-name is given "
                             "(default: the profile's model)")
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="names the model is served under, as vLLM's flag: requests may use any, "
                             "answers and metrics carry the first (default: --model)")
    parser.add_argument("--vllm-version", default="0.32",
                        help="vLLM release to behave as: its context-window rules and error wordings, "
                             "and what /version answers: 0.11, 0.25, 0.32, 0.33... (default: %(default)s)")
    parser.add_argument("--tokenizer", default=None, metavar="FAMILY|DIR",
                        help="prompt counting: a tokenizer family (llama3, llama3_1, qwen3) or a directory "
                             "with tokenizer.json and tokenizer_config.json (default: by the served model "
                             "name: llama-3.1 -> llama3_1, llama-3 -> llama3, qwen -> qwen3)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="largest request body accepted; larger ones get a 413 (default: %(default)s)")
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
    if args.max_body_bytes < 1:
        raise ValueError("--max-body-bytes must be >= 1")
    return EngineConfig(profile=profile, model=args.model, time_scale=args.time_scale,
                        output_policy=OutputPolicy.parse(args.output_tokens),
                        served_names=tuple(args.served_model_name or ()),
                        vllm_version=VllmVersion.parse(args.vllm_version), tokenizer=args.tokenizer,
                        max_body_bytes=args.max_body_bytes)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        app = create_app(config)
    except ValueError as exc:
        logging.getLogger(__name__).error("%s", exc)
        return 2
    p = config.profile
    print(f"simulated vLLM {config.vllm_version.release}: served={','.join(config.served)} profile={p.name} max_model_len={p.max_model_len} "
          f"max_num_seqs={p.max_num_seqs} kv_capacity_tokens={p.kv_capacity_tokens} "
          f"time_scale={config.time_scale}", flush=True)
    web.run_app(app, host=args.host, port=args.port, access_log=None,
                print=lambda msg: print(msg, flush=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m extproc.engine", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
