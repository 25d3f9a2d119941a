"""The serve-engine command: argument wiring, and ``python -m extproc.engine`` serving for real."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from extproc.engine import cli

REPO = Path(__file__).resolve().parents[2]


def test_register_adds_serve_engine_with_flags():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cli.register(sub)
    args = parser.parse_args(["serve-engine", "--port", "9001", "--profile", "long", "--max-num-seqs", "4",
                              "--time-scale", "0.1", "--output-tokens", "max", "--model", "Qwen/Qwen3-8B"])
    assert args.func is cli.run and args.host == "127.0.0.1"
    config = cli.config_from_args(args)
    assert config.profile.max_model_len == 65_536 and config.profile.max_num_seqs == 4
    assert config.time_scale == 0.1 and config.output_policy.default_tokens is None
    assert config.served_model == "Qwen/Qwen3-8B"
    assert config.vllm_version.release == "0.32.0" and config.served == ("Qwen/Qwen3-8B",)
    args = parser.parse_args(["serve-engine", "--served-model-name", "a/b", "c", "--vllm-version", "v0.11.0",
                              "--tokenizer", "llama3", "--max-body-bytes", "1000"])
    config = cli.config_from_args(args)
    assert config.served == ("a/b", "c") and config.served_model == "a/b"
    assert config.vllm_version.release == "0.11.0" and config.tokenizer == "llama3"
    assert config.max_body_bytes == 1000
    with pytest.raises(ValueError):
        cli.config_from_args(parser.parse_args(["serve-engine", "--vllm-version", "latest"]))
    with pytest.raises(ValueError):
        cli.config_from_args(parser.parse_args(["serve-engine", "--output-tokens", "lots"]))
    with pytest.raises(ValueError):
        cli.config_from_args(parser.parse_args(["serve-engine", "--max-model-len", "4000000"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_python_m_extproc_engine_serves():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "extproc.engine", "--port", str(port), "--time-scale", "0",
                             "--max-model-len", "2048"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1) as resp:
                    models = json.load(resp)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.monotonic() < deadline, "engine did not start within 20 s"
                time.sleep(0.1)
        assert models["data"][0]["max_model_len"] == 2048
    finally:
        proc.terminate()
        proc.wait(timeout=10)
