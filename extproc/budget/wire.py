"""A learned sample as a compact, JSON-able document, and back: what replicas sharing one
calibration send each other (service/shared_state.py); likewise what a response told
(``ResponseFacts``), for the replica that decided the request when another one read it.

A sample is what ``BudgetRouter.observe`` takes: the ``Observation`` (the model, the tokenizer
family's name, each prompt's measured feature counts — never its text, which is gone once the
features are measured), the true prompt count, whether it was a lower bound, and the client's
opaque hash. Feature vectors are sparse (a prompt excites a few dozen of the features) and their
floats are written exactly (JSON's shortest round-trip form), so every replica applies the very
same numbers and their calibrations stay equal.

``sample_from_doc`` trusts nothing: a document read from a shared store may be corrupt or
hostile. Every field is type- and range-checked and bounded; anything else is a ValueError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .features import N_FEATURES
from .priors import Family
from .request import Prompt
from .response import MISROUTE_KINDS, OTHER_ERROR, ResponseFacts

WIRE_VERSION = 1
MAX_MODEL_CHARS = 200       # what request.py keeps of a model name
MAX_PROMPTS = 1024          # a batched completion's prompts
MAX_CLIENT_CHARS = 64       # client hashes are 16 hex digits
MAX_COUNT = float(1 << 40)  # no feature count, byte size or token count of a real prompt is larger
_VECTORS = (("x", "text_features"), ("j", "json_features"), ("s", "schema_features"))
_INTS = (("b", "text_bytes"), ("n", "messages"), ("ch", "chat"), ("md", "media"), ("tl", "tools"))


@dataclass(slots=True)
class Sample:
    """One learned true count, as ``BudgetRouter.observe`` takes it."""

    observation: object  # an Observation (typed loosely: budget.router imports this module's users)
    prompt_tokens: int
    client: str | None = None
    lower_bound: bool = False


def sample_to_doc(observation, prompt_tokens: int, client: str | None, lower_bound: bool) -> dict:
    """The compact document of a sample (no text: feature counts and sizes only)."""
    doc = {"w": WIRE_VERSION, "m": observation.model, "f": observation.family.name, "t": prompt_tokens,
           "p": [_prompt_doc(p) for p in observation.prompts]}
    if client is not None:
        doc["c"] = client
    if lower_bound:
        doc["lb"] = 1
    return doc


def _prompt_doc(p: Prompt) -> dict:
    d: dict = {}
    for short, name in _VECTORS:
        v = getattr(p, name)
        if v is not None:
            nz = np.flatnonzero(v)
            d[short] = [nz.tolist(), v[nz].tolist()]
    for short, name in _INTS:
        if value := getattr(p, name):
            d[short] = value
    if p.special:
        d["sp"] = p.special
    if p.measured_on_sample:
        d["ms"] = 1
    if p.exact_tokens is not None:
        d["e"] = p.exact_tokens
    return d


def sample_from_doc(doc: object, families: dict[str, Family]) -> Sample:
    """The sample a document describes, checked field by field (ValueError saying what is wrong).
    ``families``: the tokenizer families this router knows (the document names one)."""
    from .router import Observation  # (router.py is the facade over this module's users)

    if not isinstance(doc, dict) or doc.get("w") != WIRE_VERSION:
        raise ValueError("not a sample document of a known version")
    model, family, tokens, prompts = doc.get("m"), doc.get("f"), doc.get("t"), doc.get("p")
    if not isinstance(model, str) or len(model) > MAX_MODEL_CHARS:
        raise ValueError("model must be a name of at most 200 characters")
    if not isinstance(family, str) or family not in families:
        raise ValueError("unknown tokenizer family")
    if type(tokens) is not int or not 0 < tokens <= 1 << 31:
        raise ValueError("true count must be a positive integer")
    if not isinstance(prompts, list) or not 0 < len(prompts) <= MAX_PROMPTS:
        raise ValueError(f"prompts must be a list of 1..{MAX_PROMPTS}")
    client = doc.get("c")
    if client is not None and (not isinstance(client, str) or not 0 < len(client) <= MAX_CLIENT_CHARS):
        raise ValueError("client must be a short hash")
    lower = doc.get("lb", 0)
    if lower not in (0, 1) or type(lower) is not int:
        raise ValueError("lower-bound flag must be 0 or 1")
    obs = Observation(model, families[family], tuple(_prompt(p) for p in prompts))
    return Sample(obs, tokens, client, bool(lower))


def _prompt(d: object) -> Prompt:
    if not isinstance(d, dict) or not d.keys() <= _KEYS:
        raise ValueError("a prompt must be an object of known fields")
    p = Prompt()
    for short, name in _VECTORS:
        if short in d:
            setattr(p, name, _vector(d[short]))
    for short, name in _INTS:
        value = d.get(short, 0)
        if type(value) is not int or not 0 <= value <= MAX_COUNT:
            raise ValueError(f"prompt field {short!r} must be a count")
        setattr(p, name, value)
    if p.chat not in (0, 1):
        raise ValueError("prompt field 'ch' must be 0 or 1")
    p.special = _count(d.get("sp", 0))
    if d.get("ms", 0) not in (0, 1):
        raise ValueError("prompt field 'ms' must be 0 or 1")
    p.measured_on_sample = bool(d.get("ms", 0))
    exact = d.get("e")
    if exact is not None and (type(exact) is not int or not 0 <= exact <= 1 << 31):
        raise ValueError("prompt field 'e' must be a token count")
    p.exact_tokens = exact
    return p


_KEYS = frozenset(s for s, _ in _VECTORS + _INTS) | {"sp", "ms", "e"}


def _count(value: object) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or not 0 <= value <= MAX_COUNT:
        raise ValueError("a feature count must be a finite number >= 0")
    return float(value) if type(value) is float else value


def _vector(pair: object) -> np.ndarray:
    """A sparse feature vector: [indices, values], indices strictly increasing. (Checked in numpy:
    every replica parses every sample of the fleet.)"""
    if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(x, list) for x in pair):
        raise ValueError("a feature vector must be [indices, values]")
    index, values = pair
    if len(index) != len(values) or len(index) > N_FEATURES:
        raise ValueError("a feature vector's indices and values differ in length")
    v = np.zeros(N_FEATURES)
    if not index:
        return v
    try:
        idx, vals = np.asarray(index), np.asarray(values)
    except (OverflowError, ValueError):
        raise ValueError("a feature vector holds something other than numbers") from None
    if idx.ndim != 1 or idx.dtype.kind != "i" or vals.ndim != 1 or vals.dtype.kind not in "if":
        raise ValueError("feature indices must be integers and counts numbers")
    if idx[0] < 0 or idx[-1] >= N_FEATURES or (len(idx) > 1 and not (np.diff(idx) > 0).all()):
        raise ValueError("feature indices must be increasing and within the feature set")
    vals = vals.astype(float)
    if not (np.isfinite(vals).all() and (vals >= 0).all() and (vals <= MAX_COUNT).all()):
        raise ValueError("a feature count must be a finite number >= 0")
    v[idx] = vals
    return v


# -- what a response told ------------------------------------------------------------------------
_FACT_INTS = ("prompt_tokens", "completion_tokens", "window", "requested_output")
_FACT_FLAGS = ("streamed", "prompt_exact", "finish_length", "complete")
_FACT_ERRORS = frozenset(MISROUTE_KINDS[:3] + (OTHER_ERROR,))


def facts_to_doc(facts: ResponseFacts) -> dict:
    doc: dict = {"st": facts.status}
    for name in _FACT_INTS + _FACT_FLAGS:
        value = getattr(facts, name)
        if value is not None:
            doc[name] = int(value) if type(value) is bool else value
    if facts.error is not None:
        doc["error"] = facts.error
    return doc


def facts_from_doc(doc: object) -> ResponseFacts:
    """The facts a document states, checked field by field (ValueError saying what is wrong)."""
    if not isinstance(doc, dict):
        raise ValueError("facts must be an object")
    status = doc.get("st")
    if type(status) is not int or not 100 <= status <= 599:
        raise ValueError("facts need an HTTP status")
    fields: dict = {}
    for name in _FACT_INTS:
        value = doc.get(name)
        if value is not None and (type(value) is not int or not 0 <= value <= 1 << 31):
            raise ValueError(f"facts field {name!r} must be a count")
        fields[name] = value
    for name in _FACT_FLAGS:
        if name in doc:
            if doc[name] not in (0, 1) or type(doc[name]) is not int:
                raise ValueError(f"facts field {name!r} must be 0 or 1")
            fields[name] = bool(doc[name])
    error = doc.get("error")
    if error is not None and error not in _FACT_ERRORS:
        raise ValueError("facts error must be a known kind")
    return ResponseFacts(status, error=error, **fields)
