"""What the exact-count step may do: which source counts which model, and each source's caps.
Plain values (the config file fills them in: ``exact`` in config.py); no I/O here."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

SOURCES = ("local", "pool", "off")
OUTCOMES = ("counted", "timeout", "error", "capped", "too_large", "unsupported", "unavailable")


@dataclass(frozen=True, slots=True)
class ExactRule:
    """Models whose name matches ``model`` (a case-insensitive glob) are counted by ``source``."""

    model: str
    source: str = "local"            # "local", "pool" or "off"
    family: str | None = None        # local: a built-in tokenizer family (None: from the model name)
    tokenizer: str | None = None     # local: a directory with tokenizer.json + tokenizer_config.json
    pool_url: str | None = None      # pool: base URL of a vLLM serving the model (its POST /tokenize);
                                     # local: where a body above local.max_bytes is counted instead

    def matches(self, model: str) -> bool:
        return fnmatch.fnmatchcase(model.lower(), self.model.lower())


@dataclass(frozen=True, slots=True)
class LocalSettings:
    max_bytes: int = 262_144         # larger bodies are not counted here (the pool, if named, or the estimate)
    inline_bytes: int = 65_536       # larger bodies are counted in a worker thread (the event loop goes on)


@dataclass(frozen=True, slots=True)
class PoolSettings:
    timeout_s: float = 0.05          # the whole call; past it the estimate decides (an 8K-token chat: ~15 ms)
    max_concurrent: int = 16         # calls in flight at once (the pool's API server does the work)
    max_per_s: float = 200.0         # calls a second (a token bucket); over it: the estimate
    max_bytes: int = 4_194_304       # bodies above this are not sent
    max_response_bytes: int = 2_097_152  # /tokenize answers with every token id: 64K tokens < 1 MB


# On for the built-in families: Llama 3.x and Qwen3 names are counted with their own tokenizer.
DEFAULT_RULES = (ExactRule("*qwen3*", "local", family="qwen3"), ExactRule("*llama-3*", "local"),
                 ExactRule("*llama3*", "local"))


@dataclass(frozen=True, slots=True)
class ExactSettings:
    enabled: bool = True
    rules: tuple[ExactRule, ...] = DEFAULT_RULES
    local: LocalSettings = LocalSettings()
    pool: PoolSettings = PoolSettings()

    def rule_for(self, model: str) -> ExactRule | None:
        """The first rule matching a model name; None: no exact count for it."""
        if not self.enabled or not model:
            return None
        for rule in self.rules:
            if rule.matches(model):
                return None if rule.source == "off" else rule
        return None
