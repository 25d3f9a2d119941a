"""Samples on the wire (budget/wire.py) and snapshots that restore exactly: what lets replicas that
share one calibration hold the very same state."""

from __future__ import annotations

import copy
import json
import random

import orjson
import pytest

from extproc.budget import BudgetRouter
from extproc.budget.response import ResponseFacts
from extproc.budget.wire import facts_from_doc, facts_to_doc, sample_from_doc, sample_to_doc


def _samples(dev_requests, n: int, seed: int = 3) -> list[tuple[bytes, int, str]]:
    rows = random.Random(seed).choices(dev_requests, k=n)
    return [(orjson.dumps(r["body"]), r["prompt_tokens"]["llama3"], f"client{i % 9}") for i, r in enumerate(rows)]


def _learn(router: BudgetRouter, samples) -> None:
    for body, tokens, client in samples:
        _, obs = router.route_learnable(body)
        router.observe(obs, tokens, client)


def _state(router: BudgetRouter) -> str:
    return json.dumps(router.snapshot(), sort_keys=True)


def test_a_sample_sent_as_its_document_teaches_exactly_what_the_original_does(dev_requests):
    a, b = BudgetRouter(), BudgetRouter()
    for body, tokens, client in _samples(dev_requests, 200):
        _, obs = a.route_learnable(body)
        wire = orjson.dumps(sample_to_doc(obs, tokens, client, tokens % 7 == 0))
        assert b"content" not in wire and len(wire) < 4096  # feature counts, never text
        s = sample_from_doc(orjson.loads(wire), b.families)
        a.observe(obs, tokens, client, tokens % 7 == 0)
        b.observe(s.observation, s.prompt_tokens, s.client, s.lower_bound)
    assert a.estimator.samples(obs.model) > 100
    assert _state(a) == _state(b)


def _mixed(dev_texts, count, n: int, rng: random.Random) -> list[tuple[bytes, int, str | None]]:
    """Long real texts and, a third of the time, punctuation runs the features cannot see (what
    makes the filter's recent windows matter), from nine clients and some of none."""
    out = []
    for i in range(n):
        if rng.random() < 0.3:
            text = "".join(rng.choice("=-*_#") * 64 for _ in range(40)) + " the end"
        else:
            text = "\n\n".join(rng.choice(dev_texts)["text"] for _ in range(rng.randint(1, 12)))
        messages = [{"role": "user", "content": text}]
        body = orjson.dumps({"model": "meta-llama/Meta-Llama-3-8B-Instruct", "messages": messages})
        out.append((body, count(messages), f"c{i % 9}" if rng.random() < 0.8 else None))
    return out


def test_a_restored_snapshot_learns_on_exactly_as_the_state_it_was_taken_from(dev_texts, count):
    """(Before the recent windows kept each sample's group vector, the restored copy drifted off.)"""
    rng = random.Random(4)
    first, then = _mixed(dev_texts, count, 200, rng), _mixed(dev_texts, count, 200, rng)
    a = BudgetRouter()
    _learn(a, first)
    b = BudgetRouter()
    b.restore_json(json.dumps(a.snapshot()))
    _learn(a, then)
    _learn(b, then)
    assert _state(a) == _state(b)


def test_a_snapshot_without_the_group_vectors_still_restores(dev_requests):
    """Snapshots saved before the vectors were kept restore as before (the vectors start unknown)."""
    a = BudgetRouter()
    _learn(a, _samples(dev_requests, 60))
    doc = a.snapshot()
    for key in doc["keys"].values():
        key["recent"] = {b: [e[:2] for e in w] for b, w in key["recent"].items()}
    b = BudgetRouter()
    b.restore_json(json.dumps(doc))
    assert b.calibration(next(iter(doc["keys"]))) == a.calibration(next(iter(doc["keys"])))


def _valid(dev_requests) -> dict:
    router = BudgetRouter()
    body, tokens, client = _samples(dev_requests, 1)[0]
    _, obs = router.route_learnable(body)
    return sample_to_doc(obs, tokens, client, False)


def _bad_docs(doc: dict):
    p = doc["p"][0]
    yield None
    yield []
    yield {**doc, "w": 2}
    yield {**doc, "m": 5}
    yield {**doc, "m": "m" * 201}
    yield {**doc, "f": "gpt2"}
    yield {**doc, "t": 0}
    yield {**doc, "t": True}
    yield {**doc, "t": 1.5}
    yield {**doc, "t": 1 << 40}
    yield {**doc, "p": []}
    yield {**doc, "p": [p] * 1025}
    yield {**doc, "p": "x"}
    yield {**doc, "c": 7}
    yield {**doc, "c": "x" * 65}
    yield {**doc, "lb": 2}
    yield {**doc, "p": [{**p, "zz": 1}]}
    yield {**doc, "p": [{**p, "x": [[0, 0], [1.0, 2.0]]}]}        # indices not increasing
    yield {**doc, "p": [{**p, "x": [[10_000], [1.0]]}]}            # index beyond the features
    yield {**doc, "p": [{**p, "x": [[1], [-1.0]]}]}                # negative count
    yield {**doc, "p": [{**p, "x": [[1], [float("nan")]]}]}
    yield {**doc, "p": [{**p, "x": [[1], [1e300]]}]}
    yield {**doc, "p": [{**p, "x": [[1, 2], [1.0]]}]}
    yield {**doc, "p": [{**p, "x": [[1], ["a"]]}]}
    yield {**doc, "p": [{**p, "x": {"i": [1]}}]}
    yield {**doc, "p": [{**p, "n": -1}]}
    yield {**doc, "p": [{**p, "ch": 2}]}
    yield {**doc, "p": [{**p, "sp": float("inf")}]}
    yield {**doc, "p": [{**p, "e": "12"}]}
    yield {**doc, "p": [{**p, "ms": "yes"}]}


def test_every_malformed_or_hostile_document_is_refused_saying_why(dev_requests):
    doc = _valid(dev_requests)
    families = BudgetRouter().families
    sample_from_doc(copy.deepcopy(doc), families)  # the original is fine
    for bad in _bad_docs(doc):
        with pytest.raises(ValueError):
            sample_from_doc(bad, families)


def test_random_corruption_never_raises_anything_but_value_error(dev_requests):
    doc = _valid(dev_requests)
    families = BudgetRouter().families
    text = orjson.dumps(doc)
    rng = random.Random(11)
    junk = [b"null", b"-1", b"1e999", b'"x"', b"[]", b"{}", b"true", b"1.5"]
    for _ in range(2000):
        data = bytearray(text)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            data[at:at + rng.randint(0, 6)] = rng.choice(junk)
        try:
            parsed = orjson.loads(bytes(data))
        except orjson.JSONDecodeError:
            continue
        try:
            sample_from_doc(parsed, families)
        except ValueError:
            pass


def test_response_facts_go_over_the_wire_whole_and_bad_ones_are_refused():
    for facts in (ResponseFacts(200, streamed=True, prompt_tokens=812, prompt_exact=True, completion_tokens=40),
                  ResponseFacts(400, prompt_tokens=8193, error="prompt_over_window", window=8192),
                  ResponseFacts(200, prompt_tokens=8000, prompt_exact=True, finish_length=True, complete=False)):
        assert facts_from_doc(orjson.loads(orjson.dumps(facts_to_doc(facts)))) == facts
    good = facts_to_doc(ResponseFacts(200, prompt_tokens=5, prompt_exact=True))
    for bad in (None, [], {}, {**good, "st": 99}, {**good, "st": "200"}, {**good, "prompt_tokens": -1},
                {**good, "prompt_tokens": 1.5}, {**good, "prompt_tokens": 1 << 40}, {**good, "streamed": 2},
                {**good, "complete": True}, {**good, "error": "teapot"}, {**good, "window": "8192"}):
        with pytest.raises(ValueError):
            facts_from_doc(bad)
