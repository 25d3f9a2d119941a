"""Cold-start knowledge per tokenizer family: the prior coefficients of the content features
(a ridge fit on real texts with exact counts), the chat template's overheads, the cold-start
margin, how templates render tool JSON, and the family's special-token strings. priors.json is
written by benchmarks/fit_priors.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import numpy as np

from .features import FEATURE_GROUP, FEATURE_NAMES, N_FEATURES
from .specials import SpecialTokens

CONTENT_GROUPS = ("latin", "digits", "space", "punct", "cjk", "script", "lex")
# feature -> content group one-hot (features x content groups)
_ONE_HOT = np.zeros((N_FEATURES, len(CONTENT_GROUPS)))
for _i, _g in enumerate(FEATURE_GROUP):
    _ONE_HOT[_i, CONTENT_GROUPS.index(_g)] = 1.0


@dataclass(frozen=True, slots=True)
class Family:
    """Cold-start knowledge of one tokenizer family."""

    name: str
    coef: np.ndarray   # prior tokens per unit of each feature
    turn: float        # tokens the chat template adds per message
    chat: float        # tokens it adds once per request (BOS, generation prompt)
    prompt: float      # tokens added to a raw /v1/completions prompt (BOS)
    margin: float      # cross-validated cold-start margin (relative)
    json_scale: float  # template's rendering of tool JSON (indented, spaced) vs compact JSON
    per_tool: float    # tokens the template adds per tool definition (and its preamble, amortised)
    by_group: np.ndarray  # features x content groups: the prior coefficients split by group
    specials: SpecialTokens  # strings the tokenizer encodes as one token each, even typed as text


def load_priors(path: str | None = None) -> dict[str, Family]:
    if path is None:
        text = resources.files("extproc.budget").joinpath("priors.json").read_text()
    else:
        with open(path) as f:
            text = f.read()
    doc = json.loads(text)
    if tuple(doc["features"]) != FEATURE_NAMES:
        raise ValueError("priors were fitted on other features than the code measures: refit them "
                         "(benchmarks/fit_priors.py)")
    out = {}
    for name, fam in doc["families"].items():
        o = fam["overhead"]
        coef = np.array(fam["coef"], float)
        tools = fam.get("tools", {})
        out[name] = Family(name, coef, float(o["message"]), float(o["chat"]), float(o["prompt"]),
                           float(fam["margin"]), float(tools.get("json_scale", 1.0)),
                           float(tools.get("per_tool", 0.0)), coef[:, None] * _ONE_HOT,
                           SpecialTokens(fam.get("special_tokens", ())))
    return out
