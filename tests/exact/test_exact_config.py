"""The config's ``exact`` section: defaults, rules, caps, and every invalid value refused at start
with its field and the reason."""

from __future__ import annotations

import pytest

from extproc.config import ConfigError, load_config, parse_config
from extproc.exact import DEFAULT_RULES, ExactRule


def test_defaults_count_the_builtin_families_locally():
    ex = parse_config({}).exact
    assert ex.enabled and ex.rules == DEFAULT_RULES
    assert ex.rule_for("meta-llama/Llama-3.1-8B-Instruct").source == "local"
    assert ex.rule_for("Qwen/Qwen3-8B").family == "qwen3"
    assert ex.rule_for("gpt-4o") is None and ex.rule_for("mistral-7b") is None
    assert ex.pool.timeout_s == 0.05 and ex.local.inline_bytes == 65_536


def test_rules_first_match_wins_and_off_switches_a_model_off():
    ex = parse_config({"exact": {"models": [
        {"model": "llama-3.1-private*", "source": "off"},
        {"model": "llama*", "source": "pool", "pool_url": "http://vllm-short:8000/"},
        {"model": "*", "source": "local", "family": "qwen3"}]}}).exact
    assert ex.rule_for("llama-3.1-private-ft") is None
    assert ex.rule_for("Llama-3-70B") == ExactRule("llama*", "pool", pool_url="http://vllm-short:8000")
    assert ex.rule_for("anything").family == "qwen3"
    assert parse_config({"exact": {"enabled": False}}).exact.rule_for("llama-3") is None


def test_a_rule_names_a_pool_by_its_address_in_pool_addresses():
    ex = parse_config({"exact": {"pool_addresses": {"long": "http://pool-long:8000"},
                                 "models": [{"model": "*", "source": "local", "pool": "long"}]}}).exact
    assert ex.rules[0].pool_url == "http://pool-long:8000" and ex.rules[0].source == "local"
    env = {"EXTPROC_EXACT__POOL_ADDRESSES__LONG": "http://vllm-long.llm.svc:8000"}
    import pathlib, tempfile
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / "r.yaml"
        path.write_text("exact:\n  pool_addresses: {long: 'http://pool-long:8000'}\n"
                        "  models: [{model: '*', source: pool, pool: long}]\n")
        assert load_config(str(path), environ=env).exact.rules[0].pool_url == "http://vllm-long.llm.svc:8000"


def test_a_tokenizer_directory_must_hold_a_tokenizer(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    ex = parse_config({"exact": {"models": [{"model": "m*", "tokenizer": str(tmp_path)}]}}).exact
    assert ex.rules[0].tokenizer == str(tmp_path) and ex.rules[0].source == "local"
    with pytest.raises(ConfigError) as e:
        parse_config({"exact": {"models": [{"model": "m*", "tokenizer": str(tmp_path / "nope")}]}})
    assert e.value.field == "exact.models[0].tokenizer" and "tokenizer.json" in e.value.reason


def test_environment_overrides_reach_the_section(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text("exact:\n  pool:\n    timeout_s: 0.02\n")
    cfg = load_config(str(path), environ={"EXTPROC_EXACT__ENABLED": "false", "EXTPROC_EXACT__LOCAL__MAX_BYTES": "1000"})
    assert not cfg.exact.enabled and cfg.exact.local.max_bytes == 1000 and cfg.exact.pool.timeout_s == 0.02


@pytest.mark.parametrize("exact,field,reason", [
    ({"bogus": 1}, "exact.bogus", "unknown field"),
    ({"enabled": "yes"}, "exact.enabled", "true or false"),
    ({"models": {"model": "x"}}, "exact.models", "must be a list"),
    ({"models": [{"model": f"m{i}"} for i in range(65)]}, "exact.models", "at most 64"),
    ({"models": ["llama*"]}, "exact.models[0]", "mapping"),
    ({"models": [{"source": "local"}]}, "exact.models[0].model", "glob"),
    ({"models": [{"model": "x", "source": "remote"}]}, "exact.models[0].source", "local, pool, off"),
    ({"models": [{"model": "x", "family": "gpt2"}]}, "exact.models[0].family", "unknown tokenizer family"),
    ({"models": [{"model": "x", "family": "llama3", "tokenizer": "/tmp"}]}, "exact.models[0].tokenizer",
     "leave out family"),
    ({"models": [{"model": "x", "source": "pool"}]}, "exact.models[0].pool_url", "needs the URL"),
    ({"models": [{"model": "x", "source": "pool", "pool_url": "ftp://h"}]}, "exact.models[0].pool_url", "http://"),
    ({"models": [{"model": "x", "source": "pool", "pool_url": "http://h:99999"}]}, "exact.models[0].pool_url",
     "Port out of range"),
    ({"models": [{"model": "x", "source": "pool", "pool_url": "http://u:p@h"}]}, "exact.models[0].pool_url",
     "http://"),
    ({"models": [{"model": "x", "source": "pool", "pool_url": "http://h", "family": "qwen3"}]},
     "exact.models[0].source", "for source local"),
    ({"models": [{"model": "x", "when": 1}]}, "exact.models[0].when", "unknown field"),
    ({"local": {"max_bytes": -1}}, "exact.local.max_bytes", "between"),
    ({"local": {"margin_tokens": 8}}, "exact.local.margin_tokens", "unknown field"),  # counts are exact
    ({"local": {"speed": 1}}, "exact.local.speed", "unknown field"),
    ({"pool": {"timeout_s": 0}}, "exact.pool.timeout_s", "between"),
    ({"pool": {"timeout_s": "fast"}}, "exact.pool.timeout_s", "number"),
    ({"pool": {"max_concurrent": 0}}, "exact.pool.max_concurrent", "between"),
    ({"pool": {"max_per_s": -1}}, "exact.pool.max_per_s", "between"),
    ({"pool": {"max_response_bytes": 10}}, "exact.pool.max_response_bytes", "between"),
    ("on", "exact", "mapping"),
    ({"pool_addresses": {"medium": "http://h:8000"}}, "exact.pool_addresses.medium", "no such pool"),
    ({"pool_addresses": {"short": "h:8000"}}, "exact.pool_addresses.short", "http://"),
    ({"models": [{"model": "x", "source": "pool", "pool": "long"}]}, "exact.models[0].pool", "no address"),
    ({"pool_addresses": {"long": "http://h"}, "models": [{"model": "x", "source": "pool", "pool": "long",
                                                          "pool_url": "http://h"}]},
     "exact.models[0].pool_url", "leave out pool"),
])
def test_invalid_values_fail_with_field_and_reason(exact, field, reason):
    with pytest.raises(ConfigError) as e:
        parse_config({"exact": exact})
    assert e.value.field == field, e.value
    assert reason in e.value.reason, e.value
