"""docker-compose.yml, .env and the Dockerfile, checked by parsing (no Docker engine here): the
official compose-spec schema, services per profile, mounted files, ports, health checks, and that
both profiles give Envoy the same pools under the same names."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess

import pytest
import yaml
from compose_topology import COMPOSE_FILE, DOCKERFILE, ENV_FILE, REPO, compose_doc, dotenv, host_names, services

from extproc.config import load_config
from extproc.stack import envoy_binary

ROUTER_CONFIG = load_config(str(REPO / "config" / "router.yaml"), environ={})


def test_compose_file_matches_the_compose_spec_schema():
    from check_jsonschema.builtin_schemas import get_builtin_schema
    from jsonschema.validators import validator_for

    schema = get_builtin_schema("vendor.compose-spec")
    validator = validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(yaml.safe_load(COMPOSE_FILE.read_text()))]
    assert not errors, errors


def test_every_variable_the_compose_file_uses_is_in_dotenv():
    missing: set[str] = set()
    compose_doc(missing)
    assert not missing, f"variables with neither a value in .env nor a default: {sorted(missing)}"
    raw = COMPOSE_FILE.read_text()
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", raw))
    assert used <= set(dotenv()) | {"HF_TOKEN", "GRAFANA_ADMIN_PASSWORD"}, used - set(dotenv())
    assert ENV_FILE.parent == COMPOSE_FILE.parent  # compose reads .env beside the compose file


def test_profiles_swap_gpu_pools_for_simulated_ones_behind_the_same_names():
    doc = compose_doc()
    always = {"router", "redis", "envoy", "prometheus", "grafana"}
    gpu, sim = services(doc, "gpu"), services(doc, "sim")
    assert set(services(doc, None)) == always  # no pool without a profile: never both kinds
    assert set(gpu) == always | {"pool-short-gpu", "pool-long-gpu"}
    assert set(sim) == always | {"pool-short-sim", "pool-long-sim"}
    for kind, active in (("gpu", gpu), ("sim", sim)):
        names = {h for n, s in active.items() for h in host_names(n, s)}
        assert {"pool-short", "pool-long", "router", "envoy"} <= names, kind
    # the pools' windows are the router's pools (a misfit would make every long request a 400)
    windows = {p.name: p.max_context for p in ROUTER_CONFIG.budget.pools}
    for name, svc in {**gpu, **sim}.items():
        if name.startswith("pool-"):
            cmd = svc["command"]
            pool = name.split("-")[1]
            assert int(cmd[cmd.index("--max-model-len") + 1]) == windows[pool], name
            assert "--max-num-seqs" in cmd, name
    short_seqs = int(gpu["pool-short-gpu"]["command"][gpu["pool-short-gpu"]["command"].index("--max-num-seqs") + 1])
    long_seqs = int(gpu["pool-long-gpu"]["command"][gpu["pool-long-gpu"]["command"].index("--max-num-seqs") + 1])
    assert short_seqs > long_seqs  # many short sequences, few long ones


def test_gpu_pools_run_the_official_vllm_image_with_a_gpu_each():
    from extproc.engine import EngineConfig

    doc = compose_doc()
    env = dotenv()
    # the release shared/data/vllm was captured from, which the simulated engines behave as by default
    assert env["VLLM_TAG"] == "v0.32.0" == f"v{EngineConfig().vllm_version.release}"
    gpus = []
    for name in ("pool-short-gpu", "pool-long-gpu"):
        svc = doc["services"][name]
        assert svc["image"] == f"vllm/vllm-openai:{env['VLLM_TAG']}"
        assert svc["command"][svc["command"].index("--model") + 1] == env["MODEL"]
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        gpus += device["device_ids"]
        assert svc["healthcheck"]["start_period"]  # weights load for minutes: not unhealthy meanwhile
    assert gpus == [env["SHORT_POOL_GPU"], env["LONG_POOL_GPU"]] and len(set(gpus)) == 2


def test_envoy_runs_the_image_of_the_envoy_we_test_with_and_the_config_we_ship():
    doc = compose_doc()
    envoy = doc["services"]["envoy"]
    version = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, timeout=30).stdout
    tested = re.search(r"/(\d+\.\d+\.\d+)/", version)[1]
    assert envoy["image"] == f"envoyproxy/envoy:v{tested}"
    config_path = envoy["command"][envoy["command"].index("-c") + 1]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in envoy["volumes"]}
    assert mounted[config_path] == "./envoy/compose/envoy.yaml"
    assert envoy["ports"] == ["10000:10000"]  # the API only: admin stays on the compose network
    bootstrap = yaml.safe_load((REPO / "envoy" / "compose" / "envoy.yaml").read_text())
    assert bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] == 10000
    assert envoy["depends_on"]["router"]["condition"] == "service_started"  # fail-open, never a wait


@pytest.mark.parametrize("profile", ["gpu", "sim"])
def test_mounted_files_exist_and_services_have_health_checks(profile):
    for name, svc in services(compose_doc(), profile).items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no health check"
        assert svc.get("restart") == "unless-stopped", name
        for spec in svc.get("volumes", []):
            source = spec.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts {source}, which does not exist"


def test_router_image_runs_as_non_root_with_a_grpc_health_check_and_its_config():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.\d+-slim$", text, re.M)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*extproc\.service\.healthcheck", text, re.M)
    copied = re.search(r"^COPY (\S+) /etc/extproc/router.yaml", text, re.M)[1]
    assert (REPO / copied).exists()
    # the image's default command serves the config it carries (a mount replaces it)
    cmd = json.loads(re.search(r"^CMD (\[.*\])", text, re.M)[1])
    assert cmd == ["extproc", "serve", "--config", "/etc/extproc/router.yaml"]
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_router_config_with_the_image_environment_is_valid():
    from compose_topology import dockerfile_env

    env = dockerfile_env()
    config = load_config(str(REPO / "config" / "router.yaml"), environ=env)
    assert config.service.grpc_address == "0.0.0.0:50051" and config.service.http_address == "0.0.0.0:50052"
    assert config.service.snapshot_path.startswith("/var/lib/extproc/")
    assert pathlib.PurePosixPath(config.service.snapshot_path).parent.as_posix() in DOCKERFILE.read_text()
