"""Derive the estimator's cold-start priors from ../shared/data/texts/dev_texts.jsonl.

For each tokenizer family: a ridge fit (relative-error weighted) of exact token counts on the
content features of extproc.budget.features, the chat template's per-turn and fixed overheads
(measured with the model's own template and tokenizer through extproc.tokens), and a cold-start safety margin
(the 99.5th percentile of relative under-estimates of held-out concatenated texts of ~6K tokens,
from 5-fold cross-validation), and the strings the family's tokenizer encodes as one token each
even when typed as text (its added tokens, from the real tokenizer.json vLLM reads; quicktok's
list when those files cannot be had). Writes extproc/budget/priors.json.

    .venv/bin/python benchmarks/fit_priors.py [--texts PATH] [--out PATH]
    .venv/bin/python benchmarks/fit_priors.py --only-specials   # refresh the special-token lists alone
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import zlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extproc.tokens import TemplateError, counter_for, normalize_tools  # noqa: E402
from extproc.budget.features import FEATURE_NAMES, measure  # noqa: E402

DEFAULT_TEXTS = ROOT.parent / "shared" / "data" / "texts" / "dev_texts.jsonl"
FAMILIES = ("llama3", "qwen3", "llama3_1")
# Llama-3.1 has Llama-3's vocabulary (its texts' counts are the same) and its own chat template
# (a dated system block on every request, tools rendered into the first user turn).
TEXT_COUNTS = {"llama3_1": "llama3"}
RIDGE = 10.0
_ASCII_TOTALS = {"n:l", "n:U", "n:d", "n:s", "n:n", "n:t", "n:p", "n:q"}
# What the fit shrinks towards, in tokens per counted item: ~4 ASCII characters a token, one
# token per non-ASCII character, nothing for pair/run corrections. In raw (unscaled) units a
# feature seen in few texts stays near this, instead of taking a wild value that fits one
# sentence (standardised ridge did that: 85% cross-validated under-estimates on rare scripts).
SHRINK_TO = np.array([0.25 if n in _ASCII_TOTALS else 1.0 if n.startswith("n:") else 0.0
                      for n in FEATURE_NAMES])


def ridge_fit(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    w = 1.0 / np.sqrt(np.maximum(y, 1.0))  # between absolute and relative error weighting
    A, b = X * w[:, None], y * w
    return SHRINK_TO + np.linalg.solve(A.T @ A + RIDGE * np.eye(A.shape[1]), A.T @ (b - A @ SHRINK_TO))


def cv_margin(X: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> float:
    folds = rng.permutation(len(y)) % 5
    errs = []
    for k in range(5):
        tr, te = np.where(folds != k)[0], np.where(folds == k)[0]
        coef = ridge_fit(X[tr], y[tr])
        for _ in range(400):
            xs, ys = np.zeros(X.shape[1]), 0.0
            while ys < 6000:
                i = rng.choice(te)
                xs += X[i]
                ys += y[i]
            est = xs @ coef
            errs.append((ys - est) / est)
    return float(np.quantile(errs, 0.995))


def text_half(text_id: str) -> int:
    """Stable half (0 or 1) of a text, for held-out checks."""
    return zlib.crc32(text_id.encode()) & 1


def template_overheads(family: str) -> dict:
    """Fixed and per-turn tokens of the chat template (from one and two turns: a real template
    refuses an empty conversation) and what a /v1/completions prompt adds (a BOS or nothing)."""
    c = counter_for(family)
    text = c.count_text("hello")
    one = c.count_chat([{"role": "user", "content": "hello"}])
    two = c.count_chat([{"role": "user", "content": "hello"}, {"role": "user", "content": "hello"}])
    per_message = two - one - text
    return {"chat": one - per_message - text, "message": per_message,
            "prompt": c.count_prompt("hello") - text}


def tools_fit(rows: list[dict], coef: np.ndarray, family: str) -> dict:
    """How the chat template renders tool schemas, against their compact-JSON estimate:
    tokens added by ``tools`` ≈ json_scale · estimate(compact JSON) + per_tool · n_tools."""
    from extproc.budget.request import read_request

    c = counter_for(family)
    msgs = [{"role": "user", "content": "What can you do?"}]
    base = c.count_chat(msgs)
    X, y = [], []
    for row in rows:
        if row["category"] != "json":
            continue
        try:
            fns = json.loads(row["text"])
        except ValueError:
            continue
        tools = [{"type": "function", "function": f} for f in (fns if isinstance(fns, list) else [fns])]
        try:  # the tools as vLLM hands them to the template (its pydantic dump of each)
            rendered = c.count_chat(msgs, normalize_tools(tools))
        except TemplateError:
            continue  # a schema vLLM would refuse
        prompt = read_request(json.dumps({"messages": msgs, "tools": tools}).encode()).prompts[0]
        X.append([float(prompt.json @ coef), len(tools)])
        y.append(rendered - base)
    if len(y) < 5:
        return {"json_scale": 1.0, "per_tool": 0.0}
    (scale, per_tool), *_ = np.linalg.lstsq(np.array(X), np.array(y, float), rcond=None)
    return {"json_scale": round(float(scale), 4), "per_tool": round(float(per_tool), 2)}


def special_tokens(family: str) -> list[str]:
    """Every added token of the family's tokenizer: Hugging Face ``tokenizers`` (what vLLM runs)
    splits each out of the text as one token, special or not (Qwen3's ``<think>``)."""
    try:  # tokenizer.json's added tokens and those tokenizer_config.json adds, as vLLM loads them
        tokens = list(counter_for(family).special_tokens)
    except Exception as exc:  # noqa: BLE001 - offline: the same lists from quicktok
        print(f"{family}: tokenizer.json not available ({type(exc).__name__}: {exc}); quicktok's special tokens")
        import quicktok

        tokens = list(quicktok.get_encoding(family).special_tokens_set)
    return sorted(set(tokens))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=pathlib.Path, default=DEFAULT_TEXTS)
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / "extproc" / "budget" / "priors.json")
    ap.add_argument("--half", type=int, choices=(0, 1), help="fit on one half of the texts only "
                    "(split by id; routing_quality.py --half on the other half is a held-out check)")
    ap.add_argument("--only-specials", action="store_true",
                    help="refresh only the special-token lists of the existing priors (no refit)")
    args = ap.parse_args()
    if args.only_specials:
        doc = json.loads(args.out.read_text())
        for family, fam in doc["families"].items():
            fam["special_tokens"] = special_tokens(family)
            print(f"{family}: {len(fam['special_tokens'])} special-token strings")
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.out}")
        return
    if not args.texts.exists():
        sys.exit(f"texts not found: {args.texts} (the shared data set is needed to fit priors)")
    rows = [json.loads(line) for line in args.texts.open()]
    if args.half is not None:
        rows = [r for r in rows if text_half(r["id"]) == args.half]
    X = np.array([measure(r["text"]) for r in rows], float)
    rng = np.random.default_rng(20261127)
    out: dict = {"source": str(args.texts.name), "texts": len(rows), "features": list(FEATURE_NAMES),
                 "families": {}}
    for family in FAMILIES:
        y = np.array([r["tokens"][TEXT_COUNTS.get(family, family)] for r in rows], float)
        coef = ridge_fit(X, y)
        margin = cv_margin(X, y, rng)
        over = template_overheads(family)
        tools = tools_fit(rows, coef, family)
        out["families"][family] = {
            "coef": [round(float(c), 5) for c in coef],
            "overhead": over,
            "tools": tools,
            "margin": round(margin, 4),
            "special_tokens": special_tokens(family),
        }
        pred = X @ coef
        mape = float(np.mean(np.abs(pred - y) / y))
        print(f"{family}: in-sample MAPE {100 * mape:.1f}%  cold-start margin {100 * margin:.1f}%  "
              f"overheads {over} tools {tools}")
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
