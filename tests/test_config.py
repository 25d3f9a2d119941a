"""The one config file: defaults, environment overrides, and every invalid value failing at start
with its field and reason (never later, on a request)."""

import pathlib
import subprocess
import sys

import pytest
import yaml

from extproc.budget import BudgetRouter
from extproc.config import ConfigError, apply_env, load_config, parse_config


def test_no_file_is_the_built_in_defaults():
    cfg = load_config(None, {})
    assert [(p.name, p.max_context) for p in cfg.budget.pools] == [("short", 8192), ("long", 65536)]
    assert cfg.budget.estimator == "feature-kalman"
    assert cfg.service.grpc_address == "127.0.0.1:50051" and cfg.service.shadow is False
    assert cfg.service.operator_api == "read_only"  # RestoreCalibration only when asked for


def test_file_and_environment_overrides(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({
        "pools": [{"name": "big", "max_context": 131072}, {"name": "tiny", "max_context": 4096}],
        "output_reserve": {"default_tokens": 512},
        "service": {"spillover": {"pools": {"tiny": {"endpoints": ["127.0.0.1:8001"], "queue_per_instance": 8},
                                            "big": {"dns": "big-pods:8000"}}},
                    "routing_filter": "ext_proc"},
    }))
    cfg = load_config(str(path), {"EXTPROC_SERVICE__SHADOW": "true", "EXTPROC_OUTPUT_RESERVE__DEFAULT_TOKENS": "2048",
                                  "EXTPROC_ESTIMATOR__KIND": "paper-ema", "UNRELATED": "x"})
    assert [p.name for p in cfg.budget.pools] == ["tiny", "big"]  # ordered by capacity
    assert cfg.budget.default_output_tokens == 2048 and cfg.budget.estimator == "paper-ema"
    assert cfg.service.shadow is True and cfg.service.spillover.of("tiny").queue_per_instance == 8
    assert [m.pool for m in cfg.service.spillover.pools] == ["tiny", "big"]
    router = BudgetRouter(cfg.budget)
    assert router.route(b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5000}').pool == "big"


@pytest.mark.parametrize("doc, field", [
    ({"pools": []}, "pools"),
    ({"pools": [{"name": "a", "max_context": 0}]}, "pools[0].max_context"),
    ({"pools": [{"name": "a", "max_context": "8k"}]}, "pools[0].max_context"),
    ({"pools": [{"name": "a b", "max_context": 10}]}, "pools[0].name"),
    ({"pools": [{"name": "a", "max_context": 10}, {"name": "a", "max_context": 20}]}, "pools"),
    ({"pools": [{"name": "a", "max_context": 10, "gpus": 8}]}, "pools[0].gpus"),
    ({"estimator": {"kind": "magic"}}, "estimator.kind"),
    ({"estimator": {"settings": {"margin_quantile": 1.5}}}, "estimator.settings.margin_quantile"),
    ({"estimator": {"settings": {"margin_quantile": "high"}}}, "estimator.settings.margin_quantile"),
    ({"estimator": {"settings": {"nonsense": 1}}}, "estimator.settings.nonsense"),
    ({"output_reserve": {"default_tokens": -1}}, "output_reserve.default_tokens"),
    ({"media_tokens": True}, "media_tokens"),
    ({"families": {"qwen": ["qwen3"]}}, "families.qwen"),
    ({"families": {"qwen": "gpt2"}}, "families.qwen"),
    ({"default_family": "gpt2"}, "default_family"),
    ({"servce": {}}, "servce"),
    ({"service": {"grpc_address": "localhost"}}, "service.grpc_address"),
    ({"service": {"metrics_address": "127.0.0.1:99999"}}, "service.metrics_address"),
    ({"service": {"shadow": "yes"}}, "service.shadow"),
    ({"service": {"spillover": {"medium": 4}}}, "service.spillover.medium"),
    ({"service": {"spillover": {"short": 0}}}, "service.spillover.short"),
    ({"service": {"inject_stream_usage": True}}, "service.inject_stream_usage"),  # needs routing_filter ext_proc
    ({"service": {"routing_filter": "lua"}}, "service.routing_filter"),
    ({"service": {"http_address": "nowhere"}}, "service.http_address"),
    ({"service": {"pool_header": "authorization"}}, "service.pool_header"),
    ({"service": {"pool_header": "X-Pool"}}, "service.pool_header"),
    ({"service": {"pool_header": "x-token-budget"}}, "service.pool_header"),
    ({"service": {"usage_sample_rate": 2}}, "service.usage_sample_rate"),
    ({"service": {"inject_stream_usage": 1}}, "service.inject_stream_usage"),
    ({"service": {"snapshot_path": 5}}, "service.snapshot_path"),
    ({"service": {"operator_api": "on"}}, "service.operator_api"),
    ({"service": {"operator_api": True}}, "service.operator_api"),
    ({"learning": {"client_share": 0}}, "learning.client_share"),
    ({"learning": {"client_share": 1.5}}, "learning.client_share"),
    ({"learning": {"client_share": "a fifth"}}, "learning.client_share"),
    ({"learning": {"client_window": 2}}, "learning.client_window"),
    ({"learning": {"window": 100}}, "learning.window"),
    ({"service": {"client_header": "authorization"}}, "service.client_header"),  # Envoy keeps it from the check
    ({"service": {"client_header": "X-User"}}, "service.client_header"),
    ({"service": {"client_header": "x-token-user"}}, "service.client_header"),  # the router's own prefix
    ({"service": {"client_hash_key": "short"}}, "service.client_hash_key"),
    ({"service": {"client_trusted_hops": -1}}, "service.client_trusted_hops"),
    ({"estimator": {"settings": {"client_share": 2.0}}}, "estimator.settings.client_share"),
    ({"estimator": {"kind": "fixed-ratio", "settings": {"margin_quantile": 0.9}}}, "estimator.settings.margin_quantile"),
])
def test_invalid_values_name_their_field(doc, field):
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")


def test_unreadable_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.yaml"), {})
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad), {})
    bad.write_text("- a list")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(bad), {})


def test_environment_values_are_yaml_scalars():
    doc = apply_env({}, {"EXTPROC_SERVICE__SPILLOVER__SHORT": "12", "EXTPROC_SERVICE__SHADOW": "false"})
    assert doc == {"service": {"spillover": {"short": 12}, "shadow": False}}


def test_check_config_command_exit_codes(tmp_path):
    good = subprocess.run([sys.executable, "-m", "extproc", "check-config"], capture_output=True, text=True, timeout=60)
    assert good.returncode == 0 and "config OK" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"service": {"spillover": {"tiny": 3}}}))
    out = subprocess.run([sys.executable, "-m", "extproc", "check-config", str(bad)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert "service.spillover.tiny: the in-flight limit form (pool: N) is gone" in out.stderr


def test_explain_runs_on_the_bundled_sample(tmp_path):
    out = subprocess.run([sys.executable, "-m", "extproc", "explain"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)  # no ../shared here: the bundled sample is used
    assert out.returncode == 0, out.stderr
    assert "bundled sample" in out.stdout and "requests per pool" in out.stdout


def test_the_shipped_compose_config_is_valid():
    cfg = load_config(str(pathlib.Path(__file__).resolve().parents[1] / "config" / "router.yaml"), {})
    assert cfg.service.spillover.of("short").dns == "pool-short:8000" and cfg.service.routing_filter == "ext_authz"


def test_learning_guards_and_client_identity_are_configured_together():
    cfg = parse_config({"learning": {"client_share": 0.1, "client_window": 500},
                        "service": {"client_header": "x-api-key-hash", "client_hash_key": "k" * 32},
                        "estimator": {"kind": "fixed-ratio", "settings": {"ratio": 3}}})
    assert (cfg.budget.client_share, cfg.budget.client_window) == (0.1, 500)
    assert (cfg.service.client_header, cfg.service.client_hash_key) == ("x-api-key-hash", "k" * 32)
    assert cfg.budget.estimator_settings == {"ratio": 3.0}  # the registry's settings, one table for all estimators
    router = BudgetRouter(cfg.budget)
    assert (router.guard.s.client_share, router.guard.s.window, router.guard.cap) == (0.1, 500, 50)
    assert router.estimator.learns is False and router.estimator.ratio == 3.0
    assert parse_config({}).service.client_header is None  # default: the address Envoy reports


def test_snapshot_default_applies_only_where_asked_and_none_turns_it_off():
    from extproc.config import default_snapshot_path

    assert parse_config({}).service.snapshot_path is None  # tests and library users: nothing written
    assert load_config(None, environ={}, default_snapshot="/state/c.json").service.snapshot_path == "/state/c.json"
    for off in ("none", "None", "off", "", None):
        cfg = parse_config({"service": {"snapshot_path": off}}, default_snapshot="/state/c.json")
        assert cfg.service.snapshot_path is None, off
    env = {"EXTPROC_SERVICE__SNAPSHOT_PATH": "none"}
    assert load_config(None, environ=env, default_snapshot="/state/c.json").service.snapshot_path is None
    assert default_snapshot_path({"XDG_STATE_HOME": "/s"}) == "/s/extproc/calibration.json"
    assert default_snapshot_path({}).endswith("/.local/state/extproc/calibration.json")


def test_tls_section_is_checked_for_shape():
    tls = {"cert": "s.crt", "key": "s.key", "client_ca": "ca.crt",
           "envoy": {"ca": "ca.crt", "cert": "e.crt", "key": "e.key", "server_name": "router"}}
    cfg = parse_config({"service": {"tls": tls}})
    assert cfg.service.tls.client_ca == "ca.crt" and cfg.service.tls.envoy.server_name == "router"
    for broken, field in ((dict(tls, cert=None), "service.tls.cert"), (dict(tls, reload_s=0), "service.tls.reload_s"),
                          (dict(tls, port=1), "service.tls.port"),
                          (dict(tls, envoy={"ca": "ca.crt"}), "service.tls.envoy.cert"),  # mTLS: Envoy needs one
                          (dict(tls, envoy={"cert": "e.crt", "key": "e.key"}), "service.tls.envoy.ca")):
        with pytest.raises(ConfigError) as exc:
            parse_config({"service": {"tls": broken}})
        assert exc.value.field == field, (broken, exc.value)


def test_the_readme_config_block_is_the_defaults():
    """README's Config block, parsed: the config `extproc serve` runs with no file (its snapshot path
    as shown, for a user without XDG_STATE_HOME)."""
    import os
    import re

    from extproc.config import default_snapshot_path

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Config\n.*?```yaml\n(.*?)```", readme, re.S)[1]
    doc = yaml.safe_load(block)
    shown = doc["service"]["snapshot_path"]
    assert os.path.expanduser(shown) == default_snapshot_path({})
    doc["service"]["snapshot_path"] = os.path.expanduser(shown)
    assert parse_config(doc) == load_config(None, environ={}, default_snapshot=default_snapshot_path({}))


def test_the_tools_own_extproc_variables_are_not_settings_and_a_mistyped_section_is_refused():
    """EXTPROC_REAL_VLLM=0 and kin (the test tier's, the tokenizer cache's) pass through a router
    started from that environment; a variable shaped like a setting with no such field fails."""
    doc = apply_env({}, {"EXTPROC_REAL_VLLM": "0", "EXTPROC_TOKENIZER_CACHE": "/tmp/x", "EXTPROC_MEDIA_TOKENS": "9"})
    assert doc == {"media_tokens": 9}
    with pytest.raises(ConfigError, match="EXTPROC_SERVCE__SHADOW"):
        apply_env({}, {"EXTPROC_SERVCE__SHADOW": "true"})
