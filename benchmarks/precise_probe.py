"""Where the local exact count (extproc/exact/precise.py) could part from Hugging Face: a probe.

Two checks, each printing what it found, for each built-in quicktok family:

* every code point (surrogates aside) in contexts where its reading as a letter, a digit or
  neither moves a word edge (``X's``, ``X1``, ``aXb``, ``X  x``): the precise count against
  Hugging Face's, and quicktok alone against Hugging Face's. The ranges where quicktok alone
  differs are what ``precise.NEWER_LETTERS`` must hold (rerun after a quicktok or tokenizers
  upgrade); the precise count must differ nowhere;
* ``--fuzz S`` seconds of random strings from the words where the two BPEs part (the dev texts'
  words, cut and suffixed, and runs of random code points).

    .venv/bin/python benchmarks/precise_probe.py [--families llama3 qwen3] [--fuzz 30]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import quicktok  # noqa: E402

from extproc.exact import precise  # noqa: E402
from extproc.exact.local import QUICK_ENCODINGS, quick_counter  # noqa: E402
from extproc.tokens import counter_for  # noqa: E402

TEXTS = ROOT.parent / "shared" / "data" / "texts" / "dev_texts.jsonl"


def ranges(points: list[int]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for c in points:
        if out and c == out[-1][1] + 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return [(a, b) for a, b in out]


def probe_code_points(family: str) -> None:
    hf = counter_for(family)
    exact = quick_counter(hf, family)
    quick = quicktok.get_encoding(QUICK_ENCODINGS[family])
    cps = [c for c in range(0x20, 0x110000) if not 0xD800 <= c <= 0xDFFF]
    probes = [f"{chr(c)}'seviyorum {chr(c)}1 a{chr(c)}b {chr(c)}  x" for c in cps]
    t0 = time.time()
    truth = [len(e.ids) for e in hf._tok.encode_batch(probes, add_special_tokens=False)]
    wrong = [c for c, p, n in zip(cps, probes, truth) if exact.count_text(p) != n]
    apart = [c for c, p, n in zip(cps, probes, truth) if quick.count(p) != n]
    print(f"{family}: {len(cps)} code points in {time.time() - t0:.0f}s; precise count differs on {len(wrong)}"
          + (f" ({', '.join(f'U+{a:04X}-U+{b:04X}' for a, b in ranges(wrong)[:20])})" if wrong else ""))
    listed = {c for a, b in precise.NEWER_LETTERS for c in range(a, b + 1)}
    table = precise.unsure_code_points()
    missing = [c for c in apart if not table[c]]
    print(f"  quicktok alone differs on {len(apart)} ({len(ranges(apart))} ranges); {len(set(apart) - listed)} not in "
          f"NEWER_LETTERS; {len(missing)} not flagged as unsure" + (f": {ranges(missing)[:20]}" if missing else ""))


def fuzz(family: str, seconds: float, seed: int) -> None:
    hf = counter_for(family)
    exact = quick_counter(hf, family)
    words = sorted({w for line in TEXTS.open(encoding="utf-8") for w in json.loads(line)["text"].split()}) \
        if TEXTS.exists() else ["seviyorum", "rahatsız", "přičemž", "характеристики", "việc"]
    rng = random.Random(seed)
    n = bad = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pick = rng.random()
        if pick < 0.5:
            text = " ".join(rng.choice(words)[:rng.randint(1, 14)] + rng.choice(["", "i", "ı", "lar", "ing", ",", ".:"])
                            for _ in range(rng.randint(1, 20)))
        else:
            text = "".join(chr(rng.choice([rng.randint(0x20, 0x24F), rng.randint(0x400, 0x4FF), rng.randint(0x4E00, 0x4FFF),
                                           rng.randint(0x1F600, 0x1F64F), 0x20, 0x0A])) for _ in range(rng.randint(1, 40)))
        n += 1
        if exact.count_text(text) != hf.count_text(text):
            bad += 1
            if bad <= 5:
                print(f"  differs: {text!r}")
    print(f"{family}: fuzz {n} strings, {bad} differ")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=["llama3", "qwen3"], choices=sorted(QUICK_ENCODINGS))
    ap.add_argument("--fuzz", type=float, default=30.0, help="seconds of random strings per family (0: none)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    precise.NEW_PAIRS_PER_S = 1e12  # a probe checks millions of new pairs: no budget
    for family in args.families:
        probe_code_points(family)
        if args.fuzz > 0:
            fuzz(family, args.fuzz, args.seed)


if __name__ == "__main__":
    main()
