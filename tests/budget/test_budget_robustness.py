"""No body breaks route() and no usage value breaks observe(): every input gives a Decision."""

from __future__ import annotations

import json
import random
import time

import orjson
import pytest

from extproc.budget import REASONS, SOURCES, BudgetRouter, Decision, read_request
from extproc.budget.request import MAX_OUTPUT_TOKENS

CHAT = "/v1/chat/completions"
PATHS = (CHAT, "/v1/completions", "/v1/responses", "/v1/messages", "/v1/other", "")


@pytest.fixture(scope="module")
def router() -> BudgetRouter:
    return BudgetRouter()


def check(router: BudgetRouter, d: Decision) -> Decision:
    """Invariants every decision must satisfy."""
    assert isinstance(d, Decision)
    assert d.reason in REASONS and d.source in SOURCES
    names = [p.name for p in router.pools]
    assert d.pool in names
    if d.reason == "unreadable":
        assert d.pool == names[-1]
        assert d.detail, "an unreadable body must say why"
        assert (d.prompt_tokens, d.budget_tokens, d.source, d.fits) == (0, 0, "fallback", ())
    else:
        assert d.prompt_tokens >= 0 and d.budget_tokens >= d.output_tokens >= 0
        fits = tuple(p.name for p in router.pools if d.budget_tokens <= p.max_context)
        assert d.fits == fits
        if fits:
            assert (d.reason, d.pool) == ("fits", fits[0])
        else:
            assert (d.reason, d.pool) == ("too_large", names[-1])
    return d


def chat(content="hello", **extra) -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": content}], **extra})


@pytest.mark.parametrize("raw,detail", [
    (b"", "empty body"),
    (b"{", "body is not valid JSON"),
    (b'{"messages": [}', "body is not valid JSON"),
    (b"\xff\xfe\xfa\x00garbage", "body is not valid JSON"),
    (b'{"messages":[{"role":"user","content":"caf\xe9"}]}', "body is not valid JSON"),  # latin-1 byte
    (b"null", "body is not a JSON object"),
    (b"[]", "body is not a JSON object"),
    (b'[{"messages": []}]', "body is not a JSON object"),
    (b"42", "body is not a JSON object"),
    (b'"a string"', "body is not a JSON object"),
    (b"{}", "messages missing or not a list"),
    (b'{"messages": "hello"}', "messages missing or not a list"),
    (b'{"messages": {"role": "user"}}', "messages missing or not a list"),
    (b'{"messages": [{"role": "user", "content": "x"}, "oops"]}', "a message is not an object"),
    (b'{"messages": [null]}', "a message is not an object"),
    (b"[" * 100_000 + b"]" * 100_000, "body is not valid JSON"),  # beyond orjson's recursion limit
    (b'{"messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "body is not valid JSON"),
    (b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":1e400}', "body is not valid JSON"),
    (b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":NaN}', "body is not valid JSON"),
])
def test_unreadable_chat_bodies(router, raw, detail):
    d = check(router, router.route(raw, CHAT))
    assert (d.reason, d.pool, d.detail) == ("unreadable", "long", detail)


@pytest.mark.parametrize("doc,detail", [
    ({"prompt": 5}, "prompt missing, empty or of the wrong type"),
    ({"prompt": None}, "prompt missing, empty or of the wrong type"),
    ({"prompt": []}, "prompt missing, empty or of the wrong type"),
    ({"prompt": {"text": "x"}}, "prompt missing, empty or of the wrong type"),
    ({"prompt": [True, 1]}, "prompt list holds something other than strings or token ids"),
    ({"prompt": ["ok", 3]}, "prompt list holds something other than strings or token ids"),
    ({"prompt": [[1, 2], [1.5]]}, "prompt list holds something other than strings or token ids"),
])
def test_unreadable_completions_bodies(router, doc, detail):
    d = check(router, router.route(orjson.dumps(doc), "/v1/completions"))
    assert (d.reason, d.detail) == ("unreadable", detail)


@pytest.mark.parametrize("doc,detail", [
    ({"input": 5}, "input is neither a string nor a list"),
    ({"input": []}, "no input or instructions"),
    ({"model": "m"}, "no input or instructions"),
])
def test_unreadable_responses_bodies(router, doc, detail):
    d = check(router, router.route(orjson.dumps(doc), "/v1/responses"))
    assert (d.reason, d.detail) == ("unreadable", detail)


@pytest.mark.parametrize("body", [None, 12345, 3.5, object()])
def test_body_of_the_wrong_python_type(router, body):
    d = check(router, router.route(body, CHAT))
    assert d.reason == "unreadable"
    # orjson reports a non-buffer input as a JSONDecodeError, so the "unreadable type" wording
    # in read_request is never reached: either wording is accepted here
    assert d.detail in ("empty body", "body of an unreadable type", "body is not valid JSON")


def test_lone_surrogate_escape(router):
    # orjson rejects lone surrogate escapes, vLLM's Python parser accepts them: such a body is
    # read by the standard-library fallback and routed normally
    for raw in (b'{"messages":[{"role":"user","content":"\\ud800"}]}',
                b'{"messages":[{"role":"user","content":"ok"}],"model":"\\udfff"}'):
        d = check(router, router.route(raw))
        assert (d.reason, d.pool) == ("fits", "short")
    # a decoded lone surrogate cannot come off the wire as UTF-8; as a Python str it is unreadable
    d = check(router, router.route('{"messages":[{"role":"user","content":"\ud800"}]}'))
    assert (d.reason, d.pool, d.detail) == ("unreadable", "long", "body is not valid JSON")


def test_wrong_types_that_are_still_routable(router):
    d = check(router, router.route(orjson.dumps({"model": ["a", "b"], "messages": [{"role": "user", "content": "hi"}]})))
    assert (d.reason, d.pool, d.model) == ("fits", "short", "")
    d = check(router, router.route(orjson.dumps({"model": 7, "messages": [{"content": {"a": 1}}, {"content": 5},
                                                                         {"role": None, "content": None}]})))
    assert (d.reason, d.pool) == ("fits", "short") and d.prompt_tokens > 0
    d = check(router, router.route(orjson.dumps({"messages": [{"role": "user", "content": [1, None, True, {"type": 3}]}],
                                                 "tools": "not a list", "tool_choice": 5,
                                                 "response_format": "json"})))
    assert d.reason == "fits"


def test_various_body_buffer_types_agree(router):
    raw = chat("The same body as bytes, bytearray, memoryview and str.")
    decisions = [router.route(b) for b in (raw, bytearray(raw), memoryview(raw), raw.decode())]
    assert len({(d.prompt_tokens, d.budget_tokens, d.pool) for d in decisions}) == 1


@pytest.mark.parametrize("value,output", [
    (10 ** 30, MAX_OUTPUT_TOKENS), (1e308, MAX_OUTPUT_TOKENS), (2 ** 63, MAX_OUTPUT_TOKENS),
    (MAX_OUTPUT_TOKENS + 1, MAX_OUTPUT_TOKENS),
])
def test_huge_max_tokens_goes_to_the_largest_pool_as_too_large(router, value, output):
    d = check(router, router.route(chat(max_tokens=value) if value != 10 ** 30 else
                                   b'{"messages":[{"role":"user","content":"hello"}],"max_tokens":' + str(value).encode() + b"}"))
    assert (d.reason, d.pool, d.output_tokens) == ("too_large", "long", output)
    assert d.budget_tokens > 65536 and d.fits == ()


@pytest.mark.parametrize("value", [-5, -1e308, -(10 ** 30)])
def test_negative_max_tokens_uses_default(router, value):
    raw = b'{"messages":[{"role":"user","content":"hello"}],"max_tokens":' + json.dumps(value).encode() + b"}"
    d = check(router, router.route(raw))
    assert (d.reason, d.pool, d.output_tokens) == ("fits", "short", 1024)
    assert "invalid max_tokens" in d.detail


def test_deep_but_parseable_nesting_inside_a_tool(router):
    # orjson parses up to 1024 levels but serialises only up to 255: a deep tool falls back to
    # str(); a tool nested to near the parse limit must not raise (RecursionError is caught)
    for depth in (300, 1000):
        raw = b'{"messages":[{"role":"user","content":"x"}],"tools":[' + b"[" * depth + b"]" * depth + b"]}"
        d = check(router, router.route(raw))
        if d.reason == "unreadable":
            assert d.detail == "body nested too deeply"
        else:
            assert (d.reason, d.pool) == ("fits", "short")
    raw = b'{"messages":[{"role":"user","content":"x"}],"tools":[' + b"[" * 300 + b"]" * 300 + b"]}"
    assert router.route(raw).reason == "fits"


def test_8_mib_chat_body_routes_long_and_fast(router):
    unit = "The router must measure a very large prompt quickly; 12345 tokens, def f(x): return x*2\n"
    content = unit * (8 * 1024 * 1024 // len(unit) + 1)
    raw = chat(content, max_tokens=100)
    assert len(raw) > 8 * 1024 * 1024
    router.route(chat("warm up"))
    t0 = time.perf_counter()
    d = router.route(raw)
    elapsed = time.perf_counter() - t0
    check(router, d)
    assert (d.pool, d.reason, d.output_tokens) == ("long", "too_large", 100)
    assert 1_000_000 < d.prompt_tokens < 8 * 1024 * 1024 / 2  # roughly 4-5 bytes per token
    assert elapsed < 1.0, f"route() on an 8 MiB body took {elapsed:.3f} s"


def test_long_but_fitting_body_goes_to_long(router):
    # ~40K tokens of prose: over the short pool, inside the long one
    content = "Routine prose sentence about the weather and the markets today. " * 3000
    d = check(router, router.route(chat(content, max_tokens=256)))
    assert (d.pool, d.reason, d.fits) == ("long", "fits", ("long",))
    assert 25_000 < d.prompt_tokens < 50_000


def test_random_bytes_fuzz(router):
    rng = random.Random(20240601)
    valid = chat("A perfectly valid request body with some text in it.", max_tokens=64, tools=[{"a": [1, 2]}])
    reasons = set()
    for i in range(300):
        kind = i % 3
        if kind == 0:
            raw = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 200)))
        elif kind == 1:  # flip a few bytes of a valid body
            b = bytearray(valid)
            for _ in range(rng.randrange(1, 6)):
                b[rng.randrange(len(b))] = rng.getrandbits(8)
            raw = bytes(b)
        else:  # truncate or splice
            cut = rng.randrange(len(valid))
            raw = valid[:cut] + (valid[cut:] if rng.random() < 0.5 else b"")
        d = check(router, router.route(raw, rng.choice(PATHS)))
        reasons.add(d.reason)
    assert "unreadable" in reasons and "fits" in reasons


def test_hypothesis_arbitrary_json_bodies():
    router = BudgetRouter()  # its own: this test also observes
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    scalars = st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | \
        st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                          st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
    keys = st.sampled_from(["messages", "prompt", "input", "instructions", "model", "tools", "functions",
                            "max_tokens", "max_completion_tokens", "max_output_tokens", "response_format",
                            "n", "suffix", "text", "guided_json"])
    message = st.fixed_dictionaries({}, optional={"role": values, "content": values, "tool_calls": values,
                                                  "name": values, "function_call": values})
    doc = st.dictionaries(keys, values | st.lists(message, max_size=3), max_size=6)

    @hypothesis.settings(max_examples=150, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(doc=doc, path=st.sampled_from(PATHS))
    def prop(doc, path):
        raw = json.dumps(doc).encode()
        d, obs = router.route_learnable(raw, path)
        check(router, d)
        assert (obs is None) == (d.reason == "unreadable" or d.source == "exact") or obs is not None
        if d.reason != "unreadable":
            err = router.observe(obs, d.prompt_tokens + 5)  # must not raise
            assert err is None or isinstance(err, float)

    prop()


def test_hypothesis_arbitrary_bytes(router):
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    @hypothesis.settings(max_examples=200, deadline=None, database=None, derandomize=True)
    @hypothesis.given(raw=st.binary(max_size=300), path=st.sampled_from(PATHS))
    def prop(raw, path):
        check(router, router.route(raw, path))
        shape = read_request(raw, path)
        if shape.error is not None:
            assert shape.prompts == []

    prop()


# --- observe() with bad values ----------------------------------------------------------------

@pytest.mark.parametrize("value", [0, -1, -(2 ** 40), 2 ** 31 + 1, 10 ** 30, 1234.0, 1e308, float("nan"),
                                   float("inf"), True, None, "1234", [1234]])
def test_observe_rejects_bad_counts(value):
    r = BudgetRouter()
    d, obs = r.route_learnable(chat("The quick brown fox jumps over the lazy dog. " * 10))
    before = r.snapshot()
    assert r.observe(obs, value) is None
    assert r.snapshot() == before  # nothing learned
    assert r.estimator.samples("m") == 0


def test_observe_on_unreadable_and_exact_decisions():
    r = BudgetRouter()
    bad, obs = r.route_learnable(b"not json")
    assert bad.reason == "unreadable" and obs is None
    assert r.observe(obs, 100) is None
    exact, obs = r.route_learnable(orjson.dumps({"model": "m", "prompt": [1, 2, 3]}), "/v1/completions")
    assert exact.source == "exact"
    assert r.observe(obs, 3) is None  # nothing but token ids: nothing to learn
    assert r.observe(obs, 2) is None
    assert r.snapshot()["keys"] == {}
    # a Decision is a plain value: it carries nothing to learn from, and saying so beats learning nothing
    with pytest.raises(TypeError, match="Observation"):
        r.observe(Decision("short", 10, 100, "fits", "prior"), 10)


def test_observe_valid_count_returns_relative_error():
    r = BudgetRouter()
    d, obs = r.route_learnable(chat("The quick brown fox jumps over the lazy dog. " * 10))
    truth = d.prompt_tokens + 10
    err = r.observe(obs, truth)
    assert err == pytest.approx(truth / d.prompt_tokens - 1, abs=0.01)
    assert r.estimator.samples("m") == 1


def test_observe_extreme_but_accepted_counts_do_not_raise():
    r = BudgetRouter()
    d, obs = r.route_learnable(chat("The quick brown fox jumps over the lazy dog. " * 200))
    for value in (1, 2 ** 31, 1, 2 ** 31):
        err = r.observe(obs, value)
        assert isinstance(err, float)
    d2 = check(r, r.route(chat("The quick brown fox jumps over the lazy dog. " * 200)))
    assert d2.reason in ("fits", "too_large")


def test_single_absurd_observation_does_not_collapse_the_estimate():
    r = BudgetRouter()
    raw = chat("The quick brown fox jumps over the lazy dog. " * 200)
    d, obs = r.route_learnable(raw)
    assert d.prompt_tokens > 1500
    r.observe(obs, 1)
    scales = r.calibration("m")["scales"]
    assert min(scales[g] for g in ("latin", "digits", "space", "punct", "cjk", "script")) >= 0
    assert r.route(raw).prompt_tokens > d.prompt_tokens / 2


def test_a_few_absurd_observations_do_not_disable_the_short_pool():
    r = BudgetRouter()
    raw = chat("The quick brown fox jumps over the lazy dog. " * 200)
    for _ in range(200):
        d, obs = r.route_learnable(raw)
        r.observe(obs, d.prompt_tokens)
    assert r.route(raw).pool == "short"
    for _ in range(8):  # 8 of 208 samples: ~4%
        r.observe(r.route_learnable(raw)[1], 2 ** 31)
    d = r.route(raw)
    assert (d.pool, d.reason) == ("short", "fits")
    assert d.budget_tokens < 2 * d.prompt_tokens + d.output_tokens


# --- the size bound is a true upper bound --------------------------------------------------------

def test_hypothesis_the_size_bound_holds_under_roles_names_and_special_tokens():
    """Whenever the request path decides on the size bound alone (source ``bound``), the bound is
    at least what vLLM counts for the body with each built-in family's own template and tokenizer:
    custom role names (Llama-3 prints them in the turn's header), name fields, special-token
    strings typed in content (one token each, several bytes), text of any cost per byte (random
    letters and digits are a token per byte)."""
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    from extproc.tokens import counter_for

    try:
        counters = {f: counter_for(f) for f in ("llama3", "llama3_1", "qwen3")}
    except (OSError, RuntimeError) as exc:
        pytest.skip(f"tokenizer files not available: {exc}")
    specials = sorted(set().union(*(c.special_tokens for c in counters.values())))
    router = BudgetRouter()
    dense = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=3000)
    piece = st.one_of(st.text(max_size=60), st.sampled_from(specials), dense,
                      st.sampled_from(["\n", " ", "  ", "\n\n", "...", "🙂", "語"]))
    text = st.lists(piece, max_size=12).map("".join)
    long_dense = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789QXZ", min_size=1500, max_size=4000)
    role = st.one_of(st.sampled_from(["system", "user", "assistant", "developer"]), text.filter(bool),
                     st.sampled_from(specials), long_dense)
    message = st.fixed_dictionaries({"role": role, "content": text}, optional={"name": text})

    @hypothesis.settings(max_examples=120, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.example(messages=[{"role": "k9q2zb7x" * 400, "content": "hi"}],
                        model="meta-llama/Meta-Llama-3-8B-Instruct")  # a role name of ~3,000 tokens
    @hypothesis.example(messages=[{"role": "user", "content": "".join(specials[:200]) * 4}], model="acme/x")
    @hypothesis.given(messages=st.lists(message, min_size=1, max_size=5),
                      model=st.sampled_from(["meta-llama/Meta-Llama-3-8B-Instruct", "Qwen/Qwen3-8B", "acme/x"]))
    def prop(messages, model):
        body = {"model": model, "messages": messages}
        d = router.route(json.dumps(body).encode(), by_size=True)
        if d.source != "bound":
            return
        for family, counter in counters.items():
            try:
                (count,) = counter.count_request("chat", body)
            except ValueError:  # the template refuses it: vLLM answers 400, nothing to bound
                continue
            assert d.prompt_tokens >= count, (family, d.prompt_tokens, count)

    prop()
