"""The facade other parts use: body bytes in, a pool decision out; usage counts back in."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .estimate import Estimator
from .guard import GuardSettings, LearningGuard
from .policy import DEFAULT_POOLS, Pool, choose_pool, order_pools, pools_that_fit
from .priors import Family, load_priors
from .registry import make_estimator
from .request import Prompt, RequestShape, read_request

REASON_FITS = "fits"            # the smallest pool that holds the conservative budget
REASON_TOO_LARGE = "too_large"  # holds in no pool: sent to the largest
REASON_UNREADABLE = "unreadable"  # body could not be read: sent to the largest
REASONS = (REASON_FITS, REASON_TOO_LARGE, REASON_UNREADABLE)
SOURCES = ("calibrated", "prior", "exact", "fixed", "fallback", "bound")
# Upper bound on template tokens per chat turn (role headers, separators): real templates use ~5.
BOUND_TOKENS_PER_MESSAGE = 16
# An estimate the guards distrust (``distrusted``): not calibrated yet, a margin this wide, or
# features measured on a sample of a very long text. Its close range widens to ±DISTRUST_WIDTH.
DISTRUST_MARGIN = 0.25
DISTRUST_WIDTH = 0.5
# A decision is close when a capacity lies within this many safety margins of its point estimate
# (above it, each margin at least CLOSE_FLOOR of the point: a kind's margin learned on few texts
# can be narrower than a new text's error, 8.7% against a 2.7% margin on one held-out Qwen3
# multilingual prompt, which overflowed).
CLOSE_SPAN = 2.0
CLOSE_FLOOR = 0.05


@dataclass(frozen=True, slots=True)
class BudgetSettings:
    pools: tuple[Pool, ...] = DEFAULT_POOLS
    estimator: str = "feature-kalman"
    estimator_settings: dict = field(default_factory=dict)
    default_output_tokens: int = 1024   # reserve when the body names none (vLLM would run to the limit)
    media_tokens: int = 1024            # per image/audio/file part
    families: tuple[tuple[str, str], ...] = (("qwen", "qwen3"), ("llama", "llama3"))
    default_family: str = "llama3"
    priors_path: str | None = None
    # What a chat template may add beyond its per-turn tokens (BOS, a default system prompt,
    # the generation prompt): the size bound's allowance. Llama-3.1 adds ~30, Qwen3 ~10.
    template_allowance_tokens: int = 1024
    # Bounded influence per client (guard.py): no client's samples make up more than this share
    # of a model's last ``client_window`` learned samples.
    client_share: float = 0.2
    client_window: int = 256


@dataclass(slots=True)
class Decision:
    """Where a request goes and why: a plain value (what learning needs is an ``Observation``).
    (Not frozen: a frozen dataclass costs a microsecond more to build, on every request.)"""

    pool: str
    prompt_tokens: int          # point estimate of the prompt (exact for token-id prompts)
    budget_tokens: int          # conservative prompt estimate + output reserve: what routing used
    reason: str                 # one of REASONS
    source: str                 # one of SOURCES
    output_tokens: int = 0      # the output reserve in the budget
    model: str = ""
    api: str = "unknown"
    detail: str = ""            # free text for logs: why unreadable, which reserve field…
    fits: tuple[str, ...] = ()  # every pool that can hold the budget, smallest first
    margin: float = 0.0         # relative safety margin of the estimate in the budget
    content_kind: str = ""      # the kind of content whose margin applied ("" where one covers all)
    requested_output: int | None = None  # the output the body asked for (max_tokens and kin); None: none named
    prompts: int = 1            # sequences the engine will run (a batched completion has several)


@dataclass(slots=True)
class Observation:
    """What learning from a request's true prompt count needs (``BudgetRouter.observe``): the model
    it was for, the tokenizer family its estimate started from, and its measured prompts (feature
    counts only: the text itself is gone). Made only by an estimated decision."""

    model: str
    family: Family
    prompts: tuple[Prompt, ...]


@dataclass(frozen=True, slots=True)
class Explanation:
    """A decision with every number behind it, for operators (``extproc explain``, the operator
    gRPC API)."""

    decision: Decision               # the full estimate: what a request whose response is read is routed on
    family: str                      # tokenizer family whose priors the estimate starts from ("" if unread)
    calibration_key: str | None      # learned state read: the model's key, the shared overflow key, or None (priors)
    calibration_samples: int         # usage counts that state learned from
    size_bound_tokens: int | None    # set when the request path decides on the size bound alone (source "bound")
    observation: Observation | None = None  # what learning the true count would need (offline explain learns)


def distrusted(d: Decision, observation: Observation | None) -> bool:
    """Does the estimate behind ``d`` deserve less trust than its margin says? Not calibrated yet
    (priors only), a margin as wide as ``DISTRUST_MARGIN``, or features measured on a sample."""
    return d.source in ("prior", "fixed") or d.margin >= DISTRUST_MARGIN or (
        observation is not None and any(p.measured_on_sample for p in observation.prompts))


def close_to(d: Decision, pools: tuple[Pool, ...], distrust: bool = False) -> Pool | None:
    """The pool whose capacity an estimated decision lies close to, or None: pure.

    Close means the budget's range contains the capacity: the point estimate ± ``CLOSE_SPAN``
    times its safety margin (the conservative estimate less the point; above the point at least
    ``CLOSE_FLOOR`` of it), plus the output reserve.
    Both sides matter: under-estimates near a limit overflow, over-estimates are the waste; and
    the margin is a high quantile of the errors, not their bound, so the range reaches beyond it.
    A distrusted estimate's range is at least ±``DISTRUST_WIDTH`` around the point. Only pools
    below the largest count (near the largest, the request goes there whether it fits or not).
    Decisions on a proven count (the size bound, token ids, an exact count) and unreadable ones
    are never close."""
    if d.source in ("bound", "exact", "fallback") or d.reason == REASON_UNREADABLE:
        return None
    point = float(d.prompt_tokens)
    margin = d.budget_tokens - d.output_tokens - point
    low, high = point - CLOSE_SPAN * margin, point + CLOSE_SPAN * max(margin, CLOSE_FLOOR * point)
    if distrust:
        low, high = min(low, point * (1 - DISTRUST_WIDTH)), max(high, point * (1 + DISTRUST_WIDTH))
    out = d.output_tokens
    for pool in pools[:-1]:
        if low + out <= pool.max_context < high + out:
            return pool
    return None


class BudgetRouter:
    def __init__(self, settings: BudgetSettings | None = None, estimator: Estimator | None = None) -> None:
        self.settings = s = settings or BudgetSettings()
        self.pools = order_pools(s.pools)
        self.families = load_priors(s.priors_path)
        if s.default_family not in self.families:
            raise ValueError(f"default_family {s.default_family!r} has no priors")
        settings = dict(s.estimator_settings)
        if s.estimator == "feature-kalman":
            # the margin learns from requests that could sit near a pool's limit, not from tiny ones
            settings.setdefault("margin_min_tokens", max(256, self.pools[0].max_context // 4))
            settings.setdefault("client_share", s.client_share)
        self.estimator = estimator or make_estimator(s.estimator, **settings)
        self.guard = LearningGuard(GuardSettings(s.client_share, s.client_window))

    def reconfigure(self, settings: BudgetSettings) -> None:
        """New pools, reserves and families from the next decision on (a reloaded config). The
        estimator and the learning guard stay as they are, with what they learned: their own
        settings are fixed at start (service/reload.py refuses a change of them)."""
        if settings.default_family not in self.families:
            raise ValueError(f"default_family {settings.default_family!r} has no priors")
        self.pools = order_pools(settings.pools)
        self.settings = settings

    def family_for(self, model: str) -> Family:
        m = model.lower()
        for needle, family in self.settings.families:
            if needle in m and family in self.families:
                return self.families[family]
        return self.families[self.settings.default_family]

    # -- the request path ----------------------------------------------------------------------
    def route(self, body: bytes | bytearray | memoryview | str, path: str = "/v1/chat/completions",
              by_size: bool = False) -> Decision:
        """Choose a pool for one request. Never raises on any body.

        ``by_size``: when the request's size alone proves that it fits the smallest pool, decide
        on that bound (source ``bound``; ``prompt_tokens`` is then the bound, not an estimate)
        without measuring features — most requests are short, and this is most of route()'s
        cost. Such a decision teaches the calibrator nothing (``decide`` gives the estimate for
        a request whose usage will be read, from the same parse)."""
        return self.decide(self.read(body, path), by_size)[0]

    def route_learnable(self, body: bytes | bytearray | memoryview | str,
                        path: str = "/v1/chat/completions") -> tuple[Decision, Observation | None]:
        """``route`` on the full estimate, with what ``observe`` needs to learn the request's true
        count (None where there is nothing to learn: unreadable bodies, token ids only)."""
        return self.decide(self.read(body, path))

    def read(self, body: bytes | bytearray | memoryview | str, path: str = "/v1/chat/completions") -> RequestShape:
        """Parse a body once (features not measured yet); ``decide`` takes it from there. Never raises."""
        try:
            return read_request(body, path, measured=False)
        except Exception as exc:  # noqa: BLE001 - a bug must cost efficiency, never the request
            return RequestShape(api="unknown", error=f"internal error: {type(exc).__name__}")

    def decide(self, shape: RequestShape, by_size: bool = False) -> tuple[Decision, Observation | None]:
        """The decision for a parsed body, and what learning its true count needs. Deciding
        again on the same shape (by size first, then in full) measures its features once and
        parses nothing twice. Never raises."""
        try:
            return self._decide(shape, by_size)
        except Exception as exc:  # noqa: BLE001 - a bug must cost efficiency, never the request
            return Decision(self.pools[-1].name, 0, 0, REASON_UNREADABLE, "fallback",
                            detail=f"internal error: {type(exc).__name__}"), None

    def _size_bound(self, prompts: list[Prompt]) -> int | None:
        """Tokens the longest prompt can need at most, from sizes alone: a BPE or SentencePiece
        token covers at least one byte of text (a special-token string typed in the text is
        several bytes and one token), so tokens <= UTF-8 bytes, plus the template's tokens. None
        where no such cheap bound holds: JSON the template re-renders (tools, arguments,
        schemas) and media parts. (The caller also rules out requests whose template renders
        more than the gathered text: ``RequestShape.template_extras``.)"""
        bound = 0
        for p in prompts:
            if p.exact_tokens is not None:
                tokens = p.exact_tokens
            elif p.tools or p.media or (p.unmeasured and p.unmeasured.keys() - {"text"}) or \
                    p.json_features is not None or p.schema_features is not None:
                return None
            else:
                tokens = (p.text_bytes + BOUND_TOKENS_PER_MESSAGE * p.messages
                          + self.settings.template_allowance_tokens)
            bound = max(bound, tokens)
        return bound

    def _decide(self, shape: RequestShape, by_size: bool) -> tuple[Decision, Observation | None]:
        largest = self.pools[-1]
        if shape.error or not shape.prompts:
            return Decision(largest.name, 0, 0, REASON_UNREADABLE, "fallback", model=shape.model,
                            api=shape.api, detail=shape.error or "no prompt"), None
        out = shape.output_tokens if shape.output_tokens is not None else self.settings.default_output_tokens
        detail = shape.output_field or "default output reserve"
        if shape.notes:
            detail += "; " + ", ".join(shape.notes)
        if by_size and shape.api != "responses" and not shape.template_extras:
            bound = self._size_bound(shape.prompts)
            smallest = self.pools[0]
            if bound is not None and bound + out <= smallest.max_context:
                return Decision(smallest.name, bound, bound + out, REASON_FITS, "bound", output_tokens=out,
                                model=shape.model, api=shape.api, detail=detail,
                                requested_output=shape.output_tokens, prompts=len(shape.prompts),
                                fits=tuple(p.name for p in pools_that_fit(self.pools, bound + out))), None
        family = self.family_for(shape.model)
        media = self.settings.media_tokens
        best_point, best_cons, source, margin, kind = 0.0, 0, "exact", 0.0, ""
        for p in shape.prompts:  # a batched completion needs room for its longest prompt
            est = self.estimator.estimate(shape.model, family, p.measure(family.specials), media)
            if est.conservative >= best_cons:
                best_point, best_cons, margin, kind = max(best_point, est.tokens), est.conservative, est.margin, est.kind
                if est.source != "exact" or source == "exact":
                    source = est.source
        budget = best_cons + out
        pool, fits = choose_pool(self.pools, budget)
        decision = Decision(pool.name, int(round(best_point)), budget, REASON_FITS if fits else REASON_TOO_LARGE,
                            source, output_tokens=out, model=shape.model, api=shape.api, detail=detail,
                            fits=tuple(p.name for p in pools_that_fit(self.pools, budget)), margin=margin,
                            content_kind=kind, requested_output=shape.output_tokens, prompts=len(shape.prompts))
        return decision, Observation(shape.model, family, tuple(shape.prompts))

    def explain(self, body: bytes | bytearray | memoryview | str, path: str = "/v1/chat/completions") -> Explanation:
        """What ``route`` decides for a body and why; a dry run that changes no state. Never raises."""
        shape = self.read(body, path)
        quick, _ = self.decide(shape, by_size=True)
        d, obs = self.decide(shape)
        return Explanation(d, obs.family.name if obs is not None else "", self.calibration_key(d.model),
                           self.estimator.samples(d.model) if d.model else 0,
                           quick.prompt_tokens if quick.source == "bound" else None, obs)


    def close(self, d: Decision, observation: Observation | None) -> Pool | None:
        """The pool an estimated decision lies close to (``close_to``), its estimate's trust
        judged by ``distrusted``; None when the estimate decides safely."""
        return close_to(d, self.pools, distrusted(d, observation))

    def decide_exact(self, d: Decision, prompt_tokens: int, why: str = "") -> Decision:
        """``d`` decided again on an exact prompt count (the longest prompt's, as vLLM counts it):
        the budget is the count plus the same output reserve, the pool the smallest that holds it
        (source ``exact``). ``why``: a note for the detail (which source counted, what it was close to)."""
        budget = prompt_tokens + d.output_tokens
        pool, fits = choose_pool(self.pools, budget)
        return dataclasses.replace(
            d, pool=pool.name, prompt_tokens=prompt_tokens, budget_tokens=budget, source="exact",
            reason=REASON_FITS if fits else REASON_TOO_LARGE, margin=0.0,
            fits=tuple(p.name for p in pools_that_fit(self.pools, budget)),
            detail=f"{d.detail}; {why}" if why and d.detail else (why or d.detail))

    # -- learning ------------------------------------------------------------------------------
    def observe(self, observation: Observation | None, prompt_tokens: int, client: str | None = None,
                lower_bound: bool = False) -> float | None:
        """Learn from the prompt count a response reported; returns the estimate's relative
        error (true/estimate − 1) when the sample was learned. ``client``: an opaque hash of who
        sent the request (None: unknown), whose share of the model's recent learning is bounded;
        ``lower_bound``: the response said "at least" this many."""
        if observation is None:
            return None
        if not isinstance(observation, Observation):
            raise TypeError("observe() takes the Observation of route_learnable() or decide(), not a "
                            f"{type(observation).__name__}")
        if type(prompt_tokens) is not int or prompt_tokens <= 0 or prompt_tokens > 1 << 31:
            return None
        key = self.estimator.slot(observation.model)
        if not self.guard.admits(key, client):
            self.guard.refused(key, client)
            return None
        learned = self.estimator.observe(observation.model, observation.family, list(observation.prompts),
                                         prompt_tokens, self.settings.media_tokens, client, lower_bound)
        if learned is None:
            return None
        self.guard.learned(key, client, learned)
        return learned.error

    def calibration(self, model: str) -> dict | None:
        return self.estimator.describe(model)

    def learning(self, model: str) -> dict | None:
        """What the guards know of a model's recent learning: samples per client hash, what was
        refused and what the features could not explain (no prompt text)."""
        key = self.estimator.resolve(model)
        return self.guard.describe(key) if key is not None else None

    def calibration_states(self) -> list[tuple[str, dict]]:
        """(model key, state) for every key the estimator holds (bounded by its key table)."""
        return [(k, st) for k in self.estimator.keys() if (st := self.estimator.describe(k)) is not None]

    def calibration_key(self, model: str) -> str | None:
        """The estimator state a model's estimates read, if any (see ``KeyTable.resolve``)."""
        return self.estimator.resolve(model)

    def reset(self, model: str) -> bool:
        """Forget what a model learned (its estimates read the priors again); False if nothing was held."""
        done = self.estimator.reset(model)
        self.guard.keep_only(set(self.estimator.keys()))
        return done

    def snapshot(self) -> dict:
        doc = self.estimator.snapshot()
        if self.estimator.learns:
            doc["guard"] = self.guard.snapshot()
        return doc

    def restore(self, doc: dict) -> None:
        """Replace the calibration with a snapshot's (what the guards knew included), or raise
        ValueError and change nothing."""
        guard = self.guard.parse(doc["guard"]) if isinstance(doc, dict) and "guard" in doc else {}
        self.estimator.restore(doc)
        self.guard.keys = guard
        self.guard.keep_only(set(self.estimator.keys()))

    def restore_json(self, text: str | bytes) -> None:
        """Apply a snapshot document (the JSON of ``snapshot()``), as at start-up or from the
        operator API. ValueError saying why when this router cannot use it; the calibration then
        stays as it was (estimators swap their table in whole)."""
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"snapshot is not JSON: {exc}") from None
        try:
            self.restore(doc)
        except ValueError:
            raise
        except (KeyError, TypeError, IndexError, AttributeError, RecursionError) as exc:
            raise ValueError(f"snapshot is malformed: {type(exc).__name__} {exc}") from None
