"""Config reload without a restart: on SIGHUP, or when the config file's content changes (checked
every ``service.config_reload_s``).

A new file is loaded and validated exactly as at start (the same loader, environment overrides
included); then compared with the running config field by field (``changed_fields``, any nesting of
dataclasses). A field in ``RESTART_ONLY`` (or under one) cannot change in a running router: the
whole file is refused with that field and the reason, and the running config stays, as it does
for an invalid file. Every other field is applied at once (``Service.apply_config``) — the router
reads its settings on every request — with the learned calibration, in-flight counts and
awaited responses kept. Outcomes are logged and counted in ``extproc_config_reloads_total{outcome}``.

A field added to the config is reloadable by default: one that is only read at start goes in
``RESTART_ONLY`` with its reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any, Callable

from ..config import Config, ConfigError

log = logging.getLogger("extproc.service")

OUTCOMES = ("applied", "unchanged", "invalid", "restart_required")

# dotted field (or a prefix of fields) -> why it needs a restart
RESTART_ONLY: dict[str, str] = {
    "service.grpc_address": "the gRPC server is bound to it",
    "service.http_address": "the check server is bound to it",
    "service.metrics_address": "the metrics server is bound to it",
    "service.routing_filter": "the servers and Envoy's filter chain are built for one routing filter",
    "service.tls": "the listeners are built with TLS or without, and with the files named (their contents "
                   "do reload: service.tls.reload_s)",
    "service.operator_api": "the operator API's methods are registered at start",
    "service.snapshot_path": "the calibration was restored from the snapshot named at start",
    "service.client_hash_key": "client identities hashed with the old key would not match the new ones",
    "service.shared_state": "the replica follows the shared calibration it joined at start",
    "budget.estimator": "the learned calibration belongs to the estimator it was learned with",
    "budget.estimator_settings": "the estimator is built with its settings at start",
    "budget.priors_path": "the priors are read at start",
    "budget.client_share": "the estimator and the learning guard are built with it at start",
    "budget.client_window": "the learning guard's per-client windows are sized at start",
}
# Fields Envoy's config is rendered from: a change applies in the router at once, and Envoy's
# config must be rendered again to match (``extproc envoy-config``, ``extproc deploy-manifests``).
ENVOY_RENDERED = ("budget.pools", "service.pool_header", "service.header_prefix", "service.max_request_s")


def changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the leaf fields that differ between two configs (dataclasses compared field
    by field; a dataclass against None, or anything else, is one field)."""
    if dataclasses.is_dataclass(old) and dataclasses.is_dataclass(new) and type(old) is type(new):
        out: list[str] = []
        for f in dataclasses.fields(old):
            out += changed_fields(getattr(old, f.name), getattr(new, f.name), f"{prefix}{f.name}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def restart_reason(field: str) -> str | None:
    for name, why in RESTART_ONLY.items():
        if field == name or field.startswith(name + "."):
            return why
    return None


def _comparable(config: Config) -> Config:
    return dataclasses.replace(config, source="")


class ConfigReloader:
    """Loads the config again and applies what may change. ``load`` raises ConfigError on an invalid
    file; ``apply`` installs a config; ``count(outcome)`` counts an outcome."""

    def __init__(self, path: str | None, load: Callable[[], Config], current: Callable[[], Config],
                 apply: Callable[[Config], None], count: Callable[[str], None]) -> None:
        self.path = path
        self.load = load
        self.current = current
        self.apply = apply
        self.count = count
        self.digest = self._digest()

    def _digest(self) -> str | None:
        if self.path is None:
            return None
        try:
            with open(self.path, "rb") as f:
                return hashlib.sha256(f.read(16 << 20)).hexdigest()
        except OSError:
            return None

    def file_changed(self) -> bool:
        """Whether the file's content differs from what was last loaded (a missing or unreadable
        file is a change: its reload says why it cannot be read)."""
        digest = self._digest()
        if digest == self.digest:
            return False
        self.digest = digest
        return True

    def reload(self, trigger: str) -> str:
        """One reload: the outcome (one of OUTCOMES), logged and counted."""
        self.digest = self._digest()
        try:
            new = self.load()
        except ConfigError as exc:
            log.warning("config reload (%s) refused, the running config stays: invalid %s: %s",
                        trigger, exc.field, exc.reason)
            return self._counted("invalid")
        old = self.current()
        changed = changed_fields(_comparable(old), _comparable(new))
        if not changed:
            log.info("config reload (%s): nothing changed", trigger)
            return self._counted("unchanged")
        refused = [(f, restart_reason(f)) for f in changed]
        refused = [(f, why) for f, why in refused if why]
        if refused:
            log.warning("config reload (%s) refused, the running config stays: %s", trigger,
                        "; ".join(f"{f} needs a restart ({why})" for f, why in refused))
            return self._counted("restart_required")
        self.apply(new)
        log.info("config reloaded (%s) from %s: %s changed", trigger, new.source, ", ".join(changed))
        rendered = [f for f in changed if f.startswith(ENVOY_RENDERED)]
        if rendered:
            log.warning("%s changed: Envoy's config is rendered from it, render it again to match", ", ".join(rendered))
        return self._counted("applied")

    def _counted(self, outcome: str) -> str:
        assert outcome in OUTCOMES  # the metric's label set
        self.count(outcome)
        return outcome
