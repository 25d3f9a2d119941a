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
from .exact.settings import SOURCES as EXACT_SOURCES
from .exact.settings import ExactRule, ExactSettings, LocalSettings, PoolSettings

ENV_PREFIX = "EXTPROC_"
ROUTING_FILTERS = ("ext_authz", "ext_proc")
OPERATOR_API_MODES = ("read_only", "read_write", "off")
PROVENANCE = ("budget", "estimate", "source", "reason", "read", "decision", "shadow", "spilled", "exact")


@dataclass(frozen=True)
class PoolMetrics:
    """Where one pool's vLLM ``/metrics`` pages are read (service/pool_load.py) and when the pool
    counts as under pressure. ``endpoints``: fixed ``host:port`` instances; ``dns``: a
    ``name:port`` whose A/AAAA records are the pool's pods (a headless Service), re-resolved every
    period. One of the two is set."""
    pool: str
    endpoints: tuple[str, ...] = ()
    dns: str | None = None
    queue_per_instance: float = 5.0   # waiting requests per vLLM engine above which the pool is under pressure
    kv_cache: float = 0.8             # mean KV-cache use (0..1) above which it is (GIE's saturation defaults)


@dataclass(frozen=True)
class SpilloverSettings:
    """Load-aware spillover from the pools' own metrics; no pools: off."""
    pools: tuple[PoolMetrics, ...] = ()
    period_s: float = 0.25            # how often every pool is read
    timeout_s: float = 0.2            # one page's read, connection included
    stale_s: float = 1.0              # a reading older than this is no reading: no spill
    max_page_bytes: int = 1 << 20     # a real vLLM page is ~70 KB

    def of(self, pool: str) -> PoolMetrics | None:
        return next((m for m in self.pools if m.pool == pool), None)


class ConfigError(ValueError):
    """An invalid config: ``field`` is the dotted path, ``reason`` what is wrong with it."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class EnvoyTlsSettings:
    """How Envoy reaches a router serving TLS: paths as Envoy's own filesystem has them (rendered
    into its clusters by ``extproc envoy-config``; the router never reads them)."""

    ca: str                               # the CA Envoy checks the router's certificate against
    cert: str | None = None               # Envoy's client certificate and key: needed under mTLS
    key: str | None = None
    server_name: str | None = None        # SNI Envoy sends, and the name the router's certificate must carry


@dataclass(frozen=True)
class TlsSettings:
    """TLS on the router's gRPC port and check port (service/tls.py). The files are read at start
    (exist, parse, key matches certificate) and again whenever they change."""

    cert: str                             # PEM certificate chain the router presents
    key: str                              # its PEM private key
    client_ca: str | None = None          # set: mTLS, a client must present a certificate this CA signed
    reload_s: float = 10.0                # how often the files are checked for a change
    envoy: EnvoyTlsSettings | None = None


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
    spillover: SpilloverSettings = SpilloverSettings()  # from the pools' own load (service/pool_load.py)
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
    tls: TlsSettings | None = None        # TLS (and mTLS) on the gRPC and check ports; None: plaintext
    config_reload_s: float = 10.0         # the config file is checked for a change this often (0: SIGHUP only)
    # One calibration for every replica, through Redis or Valkey (service/shared_state.py):
    # redis://[user:password@]host:port/db or rediss:// (TLS); None: each replica learns alone.
    shared_state: str | None = None

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
    exact: ExactSettings = field(default_factory=ExactSettings)


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
TOP_FIELDS = BUDGET_FIELDS | {"service", "exact"}


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


def _path(doc: Mapping, key: str, path: str, required: bool = False) -> str | None:
    value = doc.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}{key}", f"must be a file path, got {value!r}")
    return value


def _tls(svc: Mapping) -> TlsSettings | None:
    """``service.tls``: the shape only; the files are read when the router starts (service/tls.py),
    since a config is also rendered into gateway manifests on machines without them."""
    if svc.get("tls") is None:
        return None
    doc = _mapping(svc, "tls", "service.")
    _check_keys(doc, {f.name for f in dataclasses.fields(TlsSettings)}, "service.tls.")
    envoy = None
    if doc.get("envoy") is not None:
        e = _mapping(doc, "envoy", "service.tls.")
        _check_keys(e, {f.name for f in dataclasses.fields(EnvoyTlsSettings)}, "service.tls.envoy.")
        envoy = EnvoyTlsSettings(ca=_path(e, "ca", "service.tls.envoy.", required=True),
                                 cert=_path(e, "cert", "service.tls.envoy."), key=_path(e, "key", "service.tls.envoy."),
                                 server_name=_path(e, "server_name", "service.tls.envoy."))
        if (envoy.cert is None) != (envoy.key is None):
            raise ConfigError("service.tls.envoy.cert", "needs service.tls.envoy.key with it (and the key the cert)")
        if doc.get("client_ca") is not None and envoy.cert is None:
            raise ConfigError("service.tls.envoy.cert", "needed with service.tls.client_ca: under mTLS Envoy must "
                              "present a client certificate")
    reload_s = doc.get("reload_s", TlsSettings.reload_s)
    if type(reload_s) not in (int, float) or not 0.1 <= reload_s <= 86400:
        raise ConfigError("service.tls.reload_s", f"must be a number between 0.1 and 86400, got {reload_s!r}")
    return TlsSettings(cert=_path(doc, "cert", "service.tls.", required=True),
                       key=_path(doc, "key", "service.tls.", required=True),
                       client_ca=_path(doc, "client_ca", "service.tls."), reload_s=float(reload_s), envoy=envoy)


_SNAPSHOT_OFF = ("", "none", "off")


def default_snapshot_path(environ: Mapping[str, str] | None = None) -> str:
    """Where a bare ``extproc serve`` keeps its calibration: ``$XDG_STATE_HOME/extproc/``, else
    ``~/.local/state/extproc/`` (the XDG base directory spec's place for state)."""
    env = os.environ if environ is None else environ
    state = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "extproc", "calibration.json")


def _snapshot(svc: Mapping, default: str | None) -> str | None:
    """``service.snapshot_path``: a path; ``none``, ``off`` or "" (or YAML null) turn it off; not
    named at all: ``default`` (``extproc serve`` passes default_snapshot_path(); library users and
    tests that build configs get none, so nothing writes into a home directory unasked)."""
    if "snapshot_path" not in svc:
        return default
    value = svc["snapshot_path"]
    if value is None or (isinstance(value, str) and value.strip().lower() in _SNAPSHOT_OFF):
        return None
    if not isinstance(value, str):
        raise ConfigError("service.snapshot_path", f"must be a file path, or none to keep no snapshot, got {value!r}")
    return value


_SPILL_FIELDS = {"pools", "period_s", "timeout_s", "stale_s", "max_page_bytes"}
_SPILL_POOL_FIELDS = {"endpoints", "dns", "queue_per_instance", "kv_cache"}
MAX_POOL_ENDPOINTS = 256


def _host_port(value, path: str) -> str:
    host, sep, port = str(value).rpartition(":") if isinstance(value, str) else ("", "", "")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not bare or not port.isdigit() or not 0 < int(port) < 65536 or \
            not all(c.isalnum() or c in "-._:" for c in bare) or (":" in bare and bare == host):
        raise ConfigError(path, f"must be host:port (an IPv6 address in brackets), got {value!r}")
    return value


def _spillover(doc: Mapping, pools: tuple[Pool, ...]) -> SpilloverSettings:
    """``service.spillover``: ``{pools: {name: {endpoints: [host:port] | dns: name:port,
    queue_per_instance, kv_cache}}, period_s, timeout_s, stale_s, max_page_bytes}``; ``{}`` is off."""
    path = "service.spillover."
    names = [p.name for p in pools]
    for key, value in doc.items():
        if key not in _SPILL_FIELDS and type(value) is int:
            raise ConfigError(f"{path}{key}", "the in-flight limit form (pool: N) is gone: in-flight counts are "
                              "one replica's view. Spillover reads the pools' own vLLM metrics now: "
                              f"{path}pools.{key}: {{dns: name:port | endpoints: [host:port], "
                              "queue_per_instance: N, kv_cache: 0.9}")
    _check_keys(doc, _SPILL_FIELDS, path)
    d = SpilloverSettings()

    def num(key: str, default: float, lo: float, hi: float) -> float:
        value = doc.get(key, default)
        if type(value) not in (int, float) or not lo <= value <= hi:
            raise ConfigError(f"{path}{key}", f"must be a number between {lo} and {hi}, got {value!r}")
        return float(value)
    out = []
    for name, raw in _mapping(doc, "pools", path).items():
        at = f"{path}pools.{name}"
        if name not in names:
            raise ConfigError(at, f"no such pool (pools: {', '.join(names)})")
        if not isinstance(raw, Mapping):
            raise ConfigError(at, "must be a mapping with endpoints or dns, and the thresholds")
        _check_keys(raw, _SPILL_POOL_FIELDS, at + ".")
        if ("endpoints" in raw) == ("dns" in raw):
            raise ConfigError(at, "needs exactly one of endpoints (a list of host:port) and dns (name:port)")
        endpoints = raw.get("endpoints", [])
        if not isinstance(endpoints, list) or "endpoints" in raw and not 0 < len(endpoints) <= MAX_POOL_ENDPOINTS:
            raise ConfigError(f"{at}.endpoints", f"must be a list of 1 to {MAX_POOL_ENDPOINTS} host:port")
        eps = tuple(_host_port(e, f"{at}.endpoints[{i}]") for i, e in enumerate(endpoints))
        dns = _host_port(raw["dns"], f"{at}.dns") if "dns" in raw else None
        q = raw.get("queue_per_instance", PoolMetrics.queue_per_instance)
        if type(q) not in (int, float) or not 0 <= q <= 1e6:
            raise ConfigError(f"{at}.queue_per_instance", f"must be a number between 0 and 1e6, got {q!r}")
        kv = raw.get("kv_cache", PoolMetrics.kv_cache)
        if type(kv) not in (int, float) or not 0 < kv <= 1:
            raise ConfigError(f"{at}.kv_cache", f"must be a share of the KV cache in (0, 1], got {kv!r}")
        out.append(PoolMetrics(name, eps, dns, float(q), float(kv)))
    if len(out) == 1:
        raise ConfigError(f"{path}pools", "spillover reads the pool it spills from and a larger one it spills to: "
                          "give at least two pools")
    out.sort(key=lambda m: names.index(m.pool))
    period = num("period_s", d.period_s, 0.05, 60.0)
    timeout = num("timeout_s", d.timeout_s, 0.01, 60.0)
    stale = num("stale_s", d.stale_s, 0.1, 600.0)
    if stale < period:
        raise ConfigError(f"{path}stale_s", f"must be at least period_s ({period:g}): every reading would be stale")
    return SpilloverSettings(tuple(out), period, timeout, stale,
                             _int(doc, "max_page_bytes", path, d.max_page_bytes, lo=4096, hi=64 << 20))


def _service(doc: Mapping, pools: tuple[Pool, ...], default_snapshot: str | None = None) -> ServiceSettings:
    svc = _mapping(doc, "service", "")
    d = ServiceSettings()
    _check_keys(svc, {f.name for f in dataclasses.fields(ServiceSettings)}, "service.")
    for flag in ("shadow", "inject_stream_usage"):
        if type(svc.get(flag, False)) is not bool:
            raise ConfigError(f"service.{flag}", f"must be true or false, got {svc.get(flag)!r}")
    shadow = svc.get("shadow", d.shadow)
    spill = _spillover(_mapping(svc, "spillover", "service."), pools)
    snapshot = _snapshot(svc, default_snapshot)
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
        spillover=spill,
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
        tls=_tls(svc),
        config_reload_s=_number(svc, "config_reload_s", d.config_reload_s, 0.0, 86400.0),
    )


# -- exact counts near a threshold (issue 12) ---------------------------------------------------

def _exact_url(value: object, path: str) -> str:
    from urllib.parse import urlsplit

    if not isinstance(value, str):
        raise ConfigError(path, f"must be an http:// or https:// URL of a vLLM server, got {value!r}")
    try:
        u = urlsplit(value)
        port = u.port
    except ValueError as exc:
        raise ConfigError(path, f"is not a URL: {exc}") from None
    if u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment or u.username:
        raise ConfigError(path, f"must be an http:// or https:// URL of a vLLM server, got {value!r}")
    if port is not None and not 0 < port < 65536:
        raise ConfigError(path, "port must be in 1..65535")
    return value.rstrip("/")


def _exact_rule(item: object, i: int, addresses: Mapping[str, str]) -> ExactRule:
    from .tokens.files import BUILTIN, CONFIG_FILE, TOKENIZER_FILE

    path = f"exact.models[{i}]."
    if not isinstance(item, Mapping):
        raise ConfigError(f"exact.models[{i}]", "must be a mapping with model and source")
    _check_keys(item, {"model", "source", "family", "tokenizer", "pool", "pool_url"}, path)
    model = item.get("model")
    if not isinstance(model, str) or not model or len(model) > 256:
        raise ConfigError(f"{path}model", f"must be a model-name glob such as 'llama*', got {model!r}")
    source = item.get("source", "local")
    if source not in EXACT_SOURCES:
        raise ConfigError(f"{path}source", f"must be one of {', '.join(EXACT_SOURCES)}, got {source!r}")
    family, tokenizer = item.get("family"), item.get("tokenizer")
    if family is not None and family not in BUILTIN:
        raise ConfigError(f"{path}family", f"unknown tokenizer family {family!r} (built in: {', '.join(BUILTIN)})")
    if tokenizer is not None:
        if family is not None:
            raise ConfigError(f"{path}tokenizer", "names a tokenizer directory: leave out family")
        if not isinstance(tokenizer, str) or not os.path.isfile(os.path.join(tokenizer, TOKENIZER_FILE)):
            raise ConfigError(f"{path}tokenizer", f"must be a directory holding {TOKENIZER_FILE} (and "
                              f"{CONFIG_FILE} with the chat template), got {tokenizer!r}")
    url = item.get("pool_url")
    if url is not None:
        if item.get("pool") is not None:
            raise ConfigError(f"{path}pool_url", "names an address: leave out pool")
        url = _exact_url(url, f"{path}pool_url")
    elif item.get("pool") is not None:  # a pool by name: its address from exact.pool_addresses
        url = addresses.get(item["pool"])
        if url is None:
            raise ConfigError(f"{path}pool", f"no address for pool {item['pool']!r} in exact.pool_addresses "
                              f"(has: {', '.join(sorted(addresses)) or 'none'})")
    if source == "pool" and url is None:
        raise ConfigError(f"{path}pool_url", "source pool needs the URL of a vLLM serving the model "
                          "(pool_url, or pool: a pool named in exact.pool_addresses)")
    if source != "local" and (family is not None or tokenizer is not None):
        raise ConfigError(f"{path}source", "family and tokenizer are for source local")
    return ExactRule(model, source, family, tokenizer, url)


def _exact_number(doc: Mapping, key: str, path: str, default: float, lo: float, hi: float) -> float:
    value = doc.get(key, default)
    if type(value) not in (int, float) or not lo <= value <= hi:
        raise ConfigError(f"{path}{key}", f"must be a number between {lo} and {hi}, got {value!r}")
    return float(value)


def _exact(doc: Mapping, pools: tuple[Pool, ...]) -> ExactSettings:
    ex = _mapping(doc, "exact", "")
    _check_keys(ex, {"enabled", "models", "local", "pool", "pool_addresses"}, "exact.")
    # where each pool's vLLM answers /tokenize (EXTPROC_EXACT__POOL_ADDRESSES__SHORT=... per deployment)
    addresses = {}
    names = {p.name for p in pools}
    for name, url in _mapping(ex, "pool_addresses", "exact.").items():
        if name not in names:
            raise ConfigError(f"exact.pool_addresses.{name}", f"no such pool (pools: {', '.join(sorted(names))})")
        addresses[name] = _exact_url(url, f"exact.pool_addresses.{name}")
    d = ExactSettings()
    enabled = ex.get("enabled", d.enabled)
    if type(enabled) is not bool:
        raise ConfigError("exact.enabled", f"must be true or false, got {enabled!r}")
    raw = ex.get("models")
    if raw is None:
        rules = d.rules
    elif not isinstance(raw, list) or len(raw) > 64:
        raise ConfigError("exact.models", "must be a list (at most 64) of {model, source, family | tokenizer, pool_url}")
    else:
        rules = tuple(_exact_rule(item, i, addresses) for i, item in enumerate(raw))
    local = _mapping(ex, "local", "exact.")
    _check_keys(local, {f.name for f in dataclasses.fields(LocalSettings)}, "exact.local.")
    ld = LocalSettings()
    pool = _mapping(ex, "pool", "exact.")
    _check_keys(pool, {f.name for f in dataclasses.fields(PoolSettings)}, "exact.pool.")
    pd = PoolSettings()
    return ExactSettings(
        enabled=enabled, rules=rules,
        local=LocalSettings(
            max_bytes=_int(local, "max_bytes", "exact.local.", ld.max_bytes, lo=0, hi=1 << 30),
            inline_bytes=_int(local, "inline_bytes", "exact.local.", ld.inline_bytes, lo=0, hi=1 << 30)),
        pool=PoolSettings(
            timeout_s=_exact_number(pool, "timeout_s", "exact.pool.", pd.timeout_s, 0.001, 10.0),
            max_concurrent=_int(pool, "max_concurrent", "exact.pool.", pd.max_concurrent, lo=1, hi=4096),
            max_per_s=_exact_number(pool, "max_per_s", "exact.pool.", pd.max_per_s, 0.0, 1e6),
            max_bytes=_int(pool, "max_bytes", "exact.pool.", pd.max_bytes, lo=0, hi=1 << 30),
            max_response_bytes=_int(pool, "max_response_bytes", "exact.pool.", pd.max_response_bytes,
                                    lo=1024, hi=1 << 30)))


def parse_config(doc: Mapping | None, source: str = "built-in defaults", default_snapshot: str | None = None) -> Config:
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
    return Config(budget=budget, service=_service(doc, budget.pools, default_snapshot), source=source,
                  exact=_exact(doc, budget.pools))


def apply_env(doc: dict, environ: Mapping[str, str]) -> dict:
    """Overlay ``EXTPROC_A__B=value`` variables onto the document (values parsed as YAML scalars)."""
    doc = dict(doc)
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        if not path:
            continue
        if path[0] not in TOP_FIELDS:
            if len(path) > 1:  # shaped like a setting: a typo must not pass unnoticed
                raise ConfigError(name, f"no such config field {path[0]!r} (fields: {', '.join(sorted(TOP_FIELDS))})")
            continue  # EXTPROC_REAL_VLLM and kin: the test tier's and tools' own variables, not settings
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


def load_config(path: str | None = None, environ: Mapping[str, str] | None = None,
                default_snapshot: str | None = None) -> Config:
    """Read, overlay the environment, validate. Raises ConfigError naming the field.
    ``default_snapshot``: the snapshot path when neither the file nor the environment names one."""
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
    return parse_config(doc, source, default_snapshot)
