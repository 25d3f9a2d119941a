"""The one YAML config file: loading, environment overrides and validation.

Every field has a built-in default, so no file at all is a valid config. An invalid value fails
at start with the field's dotted path and the reason (``ConfigError``), never later on a request.

Environment overrides: ``EXTPROC_<FIELD>`` with ``__`` between nesting levels, values read as
YAML scalars, e.g. ``EXTPROC_OUTPUT_RESERVE__DEFAULT_TOKENS=2048`` or
``EXTPROC_ESTIMATOR__KIND=paper-ema``. Pools are a list and are set in the file only.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from .budget.policy import Pool, order_pools
from .budget.priors import load_priors
from .budget.registry import ESTIMATORS
from .budget.router import BudgetSettings

ENV_PREFIX = "EXTPROC_"
ROUTING_FILTERS = ("ext_authz", "ext_proc")
OPERATOR_API_MODES = ("read_only", "read_write", "off")
PROVENANCE = ("budget", "estimate", "source", "reason", "read", "decision", "shadow", "spilled")


class ConfigError(ValueError):
    """An invalid config: ``field`` is the dotted path, ``reason`` what is wrong with it."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class ServiceSettings:
    grpc_address: str = "127.0.0.1:50051"
    http_address: str = "127.0.0.1:50052"   # the ext_authz HTTP check endpoint (routing_filter: ext_authz)
    # Which Envoy filter asks the router for a pool: "ext_authz" (an HTTP check with the buffered
    # body: one request/response, several times less router CPU) or "ext_proc" (a gRPC stream per
    # request, which include_usage injection needs).
    routing_filter: str = "ext_authz"
    metrics_address: str = "127.0.0.1:9464"
    pool_header: str = "x-token-pool"
    header_prefix: str = "x-token-"       # provenance headers: <prefix>budget, estimate, source, reason…
    shadow: bool = False                  # decide and export, but always route to the largest pool
    spillover: tuple[tuple[str, int], ...] = ()  # (pool, in-flight limit): above it, a larger pool that fits
    usage_sample_rate: float = 0.1        # share of responses read for usage once a model is calibrated
    usage_samples_per_s: float = 20.0     # ... and at most this many a second (each read costs a gRPC stream)
    calibration_samples: int = 50         # read every response until a model has this many samples
    snapshot_path: str | None = None      # calibration snapshot: restored at start, saved periodically
    snapshot_interval_s: float = 60.0
    grace_period_s: float = 30.0          # SIGTERM: in-flight streams get this long to finish
    max_pending: int = 10_000             # decisions awaiting their response (to be read)
    max_request_s: float = 600.0          # Envoy's upstream timeout: no request runs longer
    offload_bytes: int = 262_144          # bodies above this are routed in a worker thread
    inject_stream_usage: bool = False     # read streams without include_usage: ask for usage, strip it
    # The operator gRPC API on grpc_address: Explain and GetCalibration read; RestoreCalibration
    # and ResetCalibration replace the calibration, so they wait for read_write (whoever reaches
    # the port could otherwise steer every estimate).
    operator_api: str = "read_only"
    # Who sent a request, for bounding each client's share of what the calibration learns: this
    # request header (a hashed API key or a user id that a trusted hop sets), else the client
    # address Envoy reports (the last x-forwarded-for entry). Only a keyed hash of it is kept.
    client_header: str | None = None
    client_hash_key: str | None = None    # the hash's key; unset: a random key per process start
    client_trusted_hops: int = 0          # trusted proxies in front of Envoy (their x-forwarded-for entries are skipped)
    # One calibration for every replica, through Redis or Valkey (service/shared_state.py):
    # redis://[user:password@]host:port/db or rediss:// (TLS); None: each replica learns alone.
    shared_state: str | None = None

    def spillover_limit(self, pool: str) -> int | None:
        return dict(self.spillover).get(pool)

    def provenance_header(self, name: str) -> str:
        return f"{self.header_prefix}{name}"

    def router_headers(self) -> list[str]:
        """Every header the router sets upstream: clients' copies of these are removed."""
        return [self.pool_header] + [self.provenance_header(n) for n in PROVENANCE]


@dataclass(frozen=True)
class Config:
    budget: BudgetSettings = field(default_factory=BudgetSettings)
    service: ServiceSettings = field(default_factory=ServiceSettings)
    source: str = "built-in defaults"


def _int(doc: Mapping, key: str, path: str, default: int, lo: int = 0, hi: int = 1 << 31) -> int:
    value = doc.get(key, default)
    if type(value) is not int:
        raise ConfigError(f"{path}{key}", f"must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{path}{key}", f"must be between {lo} and {hi}, got {value}")
    return value


def _mapping(doc: Mapping, key: str, path: str) -> Mapping:
    value = doc.get(key, {})
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}{key}", f"must be a mapping, got {type(value).__name__}")
    return value


def _check_keys(doc: Mapping, allowed: set[str], path: str) -> None:
    for key in doc:
        if key not in allowed:
            raise ConfigError(f"{path}{key}", f"unknown field (known: {', '.join(sorted(allowed))})")


def _pools(doc: Mapping) -> tuple[Pool, ...]:
    raw = doc.get("pools")
    if raw is None:
        return BudgetSettings().pools
    if not isinstance(raw, list) or not raw:
        raise ConfigError("pools", "must be a non-empty list of {name, max_context}")
    pools = []
    for i, item in enumerate(raw):
        path = f"pools[{i}]."
        if not isinstance(item, Mapping):
            raise ConfigError(f"pools[{i}]", "must be a mapping with name and max_context")
        _check_keys(item, {"name", "max_context"}, path)
        name = item.get("name")
        if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{path}name", f"must be a non-empty name of letters, digits, - or _, got {name!r}")
        pools.append(Pool(name, _int(item, "max_context", path, 0, lo=1)))
    try:
        return order_pools(pools)
    except ValueError as exc:
        raise ConfigError("pools", str(exc)) from None


def _estimator(doc: Mapping) -> tuple[str, dict]:
    est = _mapping(doc, "estimator", "")
    _check_keys(est, {"kind", "settings"}, "estimator.")
    kind = est.get("kind", BudgetSettings().estimator)
    if kind not in ESTIMATORS:
        raise ConfigError("estimator.kind", f"must be one of {', '.join(ESTIMATORS)}, got {kind!r}")
    settings = dict(_mapping(est, "settings", "estimator."))
    fields = {f.name: f for f in dataclasses.fields(ESTIMATORS[kind].settings)}
    for key, value in settings.items():
        path = f"estimator.settings.{key}"
        if key not in fields:
            raise ConfigError(path, f"unknown setting for {kind} (known: {', '.join(sorted(fields))})")
        expected = type(fields[key].default)
        if expected is float and type(value) is int:
            value = settings[key] = float(value)
        if type(value) is not expected:
            raise ConfigError(path, f"must be {expected.__name__}, got {value!r}")
        if value <= 0 and key not in ("margin_floor",):
            raise ConfigError(path, f"must be positive, got {value!r}")
        if key in ("margin_quantile", "beta") and not value < 1:
            raise ConfigError(path, f"must be below 1, got {value!r}")
        if key == "client_share" and not value <= 1:
            raise ConfigError(path, f"must be at most 1, got {value!r}")
    return kind, settings


def _families(doc: Mapping) -> tuple[tuple[tuple[str, str], ...], str]:
    known = set(load_priors())
    raw = doc.get("families")
    families = BudgetSettings().families
    if raw is not None:
        if not isinstance(raw, Mapping):
            raise ConfigError("families", "must map a model-name substring to a tokenizer family")
        families = []
        for needle, fam in raw.items():
            if not isinstance(fam, str) or fam not in known:
                raise ConfigError(f"families.{needle}", f"unknown tokenizer family {fam!r} (known: {', '.join(sorted(known))})")
            families.append((str(needle).lower(), fam))
        families = tuple(families)
    default = doc.get("default_family", BudgetSettings().default_family)
    if not isinstance(default, str) or default not in known:
        raise ConfigError("default_family", f"unknown tokenizer family {default!r} (known: {', '.join(sorted(known))})")
    return families, default


BUDGET_FIELDS = {"pools", "estimator", "output_reserve", "media_tokens", "families", "default_family",
                 "template_allowance_tokens", "learning"}
TOP_FIELDS = BUDGET_FIELDS | {"service"}


def _address(doc: Mapping, key: str, default: str) -> str:
    value = doc.get(key, default)
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"service.{key}", f"must be host:port with a port in 1..65535, got {value!r}")
    return str(value)


def _header(doc: Mapping, key: str, default: str) -> str:
    value = doc.get(key, default)
    if not isinstance(value, str) or not value or value.lower() != value or \
            not all(c.isalnum() or c in "-_" for c in value):
        raise ConfigError(f"service.{key}", f"must be a lower-case header name, got {value!r}")
    return value


def _number(doc: Mapping, key: str, default: float, lo: float, hi: float) -> float:
    value = doc.get(key, default)
    if type(value) not in (int, float) or not lo <= value <= hi:
        raise ConfigError(f"service.{key}", f"must be a number between {lo} and {hi}, got {value!r}")
    return float(value)


_UNFORWARDED_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})  # envoy_config.py
_RESERVED_HEADERS = frozenset({
    "authorization", "proxy-authorization", "content-type", "content-length", "content-encoding", "host",
    "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "cookie", "user-agent",
    "accept", "x-request-id", "x-forwarded-for", "x-forwarded-proto", "x-envoy-original-path"})


def _redis_url(value: object) -> str | None:
    if value is None or value == "":
        return None
    from urllib.parse import urlsplit

    why = "must be redis://host:port/db or rediss://host:port/db"
    try:
        u = urlsplit(value) if isinstance(value, str) else None
        _ = u.port if u else None  # (ValueError: not a port)
    except ValueError:
        u = None
    if u is None or u.scheme not in ("redis", "rediss") or not u.hostname or u.query or u.fragment:
        raise ConfigError("service.shared_state", f"{why}, got {_without_password(value)!r}")
    db = u.path.lstrip("/")
    if db and not db.isdigit():
        raise ConfigError("service.shared_state", f"{why} (db a number)")
    return value


def _without_password(value: object) -> object:
    if isinstance(value, str) and "@" in value:
        return value.split("://", 1)[0] + "://***@" + value.rpartition("@")[2]
    return value


def _service(doc: Mapping, pools: tuple[Pool, ...]) -> ServiceSettings:
    svc = _mapping(doc, "service", "")
    d = ServiceSettings()
    _check_keys(svc, {f.name for f in dataclasses.fields(ServiceSettings)}, "service.")
    for flag in ("shadow", "inject_stream_usage"):
        if type(svc.get(flag, False)) is not bool:
            raise ConfigError(f"service.{flag}", f"must be true or false, got {svc.get(flag)!r}")
    shadow = svc.get("shadow", d.shadow)
    spill = _mapping(svc, "spillover", "service.")
    names = {p.name for p in pools}
    for name, limit in spill.items():
        if name not in names:
            raise ConfigError(f"service.spillover.{name}", f"no such pool (pools: {', '.join(sorted(names))})")
        if type(limit) is not int or limit < 1:
            raise ConfigError(f"service.spillover.{name}", f"must be a positive in-flight limit, got {limit!r}")
    snapshot = svc.get("snapshot_path", d.snapshot_path)
    if snapshot is not None and (not isinstance(snapshot, str) or not snapshot):
        raise ConfigError("service.snapshot_path", f"must be a file path, got {snapshot!r}")
    pool_header = _header(svc, "pool_header", d.pool_header)
    if pool_header in _RESERVED_HEADERS:
        raise ConfigError("service.pool_header", f"{pool_header!r} is a standard header Envoy would strip from "
                          "every request; use a name of its own")
    prefix = _header(svc, "header_prefix", d.header_prefix)
    routing_filter = svc.get("routing_filter", d.routing_filter)
    if routing_filter not in ROUTING_FILTERS:
        raise ConfigError("service.routing_filter", f"must be one of {', '.join(ROUTING_FILTERS)}, got {routing_filter!r}")
    if routing_filter != "ext_proc":
        if svc.get("inject_stream_usage", False):
            raise ConfigError("service.inject_stream_usage", "needs service.routing_filter: ext_proc (the "
                              "routing stream reads the injected usage and keeps it from the client)")
    operator_api = svc.get("operator_api", d.operator_api)
    if operator_api not in OPERATOR_API_MODES:
        raise ConfigError("service.operator_api", f"must be one of {', '.join(OPERATOR_API_MODES)}, got {operator_api!r}")
    if pool_header.startswith(prefix) and pool_header[len(prefix):] in PROVENANCE:
        raise ConfigError("service.pool_header", f"collides with a provenance header under {prefix!r}")
    client_header = svc.get("client_header", d.client_header)
    if client_header is not None:
        client_header = _header(svc, "client_header", "")
        if client_header in _UNFORWARDED_HEADERS:
            raise ConfigError("service.client_header", f"Envoy does not forward {client_header!r} to the router "
                              "(credentials stay out of the check); name a header holding a hash of it")
        if client_header == pool_header or client_header.startswith(prefix):
            raise ConfigError("service.client_header", "is one of the router's own headers (stripped from clients)")
    hash_key = svc.get("client_hash_key", d.client_hash_key)
    if hash_key is not None and (not isinstance(hash_key, str) or len(hash_key) < 16):
        raise ConfigError("service.client_hash_key", "must be a string of at least 16 characters")
    return ServiceSettings(
        shared_state=_redis_url(svc.get("shared_state", d.shared_state)),
        grpc_address=_address(svc, "grpc_address", d.grpc_address),
        http_address=_address(svc, "http_address", d.http_address),
        routing_filter=routing_filter,
        metrics_address=_address(svc, "metrics_address", d.metrics_address),
        pool_header=pool_header,
        header_prefix=prefix,
        shadow=shadow,
        spillover=tuple((str(k), int(v)) for k, v in spill.items()),
        usage_sample_rate=_number(svc, "usage_sample_rate", d.usage_sample_rate, 0.0, 1.0),
        usage_samples_per_s=_number(svc, "usage_samples_per_s", d.usage_samples_per_s, 0.0, 1e6),
        calibration_samples=_int(svc, "calibration_samples", "service.", d.calibration_samples),
        snapshot_path=snapshot,
        snapshot_interval_s=_number(svc, "snapshot_interval_s", d.snapshot_interval_s, 1.0, 86400.0),
        grace_period_s=_number(svc, "grace_period_s", d.grace_period_s, 0.0, 3600.0),
        max_pending=_int(svc, "max_pending", "service.", d.max_pending, lo=1, hi=10_000_000),
        max_request_s=_number(svc, "max_request_s", d.max_request_s, 1.0, 86400.0),
        offload_bytes=_int(svc, "offload_bytes", "service.", d.offload_bytes, lo=1024),
        inject_stream_usage=svc.get("inject_stream_usage", d.inject_stream_usage),
        operator_api=operator_api,
        client_header=client_header,
        client_hash_key=hash_key,
        client_trusted_hops=_int(svc, "client_trusted_hops", "service.", d.client_trusted_hops, hi=16),
    )


def parse_config(doc: Mapping | None, source: str = "built-in defaults") -> Config:
    doc = doc or {}
    if not isinstance(doc, Mapping):
        raise ConfigError("(top level)", "must be a mapping")
    _check_keys(doc, TOP_FIELDS, "")
    reserve = _mapping(doc, "output_reserve", "")
    _check_keys(reserve, {"default_tokens"}, "output_reserve.")
    learning = _mapping(doc, "learning", "")
    _check_keys(learning, {"client_share", "client_window"}, "learning.")
    share = learning.get("client_share", BudgetSettings().client_share)
    if type(share) not in (int, float) or not 0 < share <= 1:
        raise ConfigError("learning.client_share", f"must be a share in (0, 1], got {share!r}")
    kind, est_settings = _estimator(doc)
    families, default_family = _families(doc)
    budget = BudgetSettings(
        pools=_pools(doc),
        estimator=kind,
        estimator_settings=est_settings,
        default_output_tokens=_int(reserve, "default_tokens", "output_reserve.", BudgetSettings().default_output_tokens),
        media_tokens=_int(doc, "media_tokens", "", BudgetSettings().media_tokens),
        template_allowance_tokens=_int(doc, "template_allowance_tokens", "",
                                       BudgetSettings().template_allowance_tokens),
        families=families,
        default_family=default_family,
        client_share=float(share),
        client_window=_int(learning, "client_window", "learning.", BudgetSettings().client_window, lo=8, hi=100_000),
    )
    return Config(budget=budget, service=_service(doc, budget.pools), source=source)


def apply_env(doc: dict, environ: Mapping[str, str]) -> dict:
    """Overlay ``EXTPROC_A__B=value`` variables onto the document (values parsed as YAML scalars)."""
    doc = dict(doc)
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        if not path:
            continue
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        node = doc
        for part in path[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, Mapping) else {}
            node[part] = child
            node = child
        node[path[-1]] = value
    return doc


def load_config(path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read, overlay the environment, validate. Raises ConfigError naming the field."""
    doc: Any = {}
    source = "built-in defaults"
    if path is not None:
        try:
            with open(path) as f:
                doc = yaml.safe_load(f) or {}
        except OSError as exc:
            raise ConfigError("(file)", f"cannot read {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError("(file)", f"{path} is not valid YAML: {exc}") from None
        if not isinstance(doc, Mapping):
            raise ConfigError("(top level)", f"{path} must hold a mapping")
        source = path
    doc = apply_env(dict(doc), os.environ if environ is None else environ)
    return parse_config(doc, source)
