"""Asking a stream for usage and stripping that event again: exact over every split, nothing held back."""

import json

from extproc.budget.stream_usage import UsageEventStripper, with_stream_usage


def test_no_injection_when_usage_would_ride_on_every_chunk():
    assert with_stream_usage(b'{"stream":true,"stream_options":{"continuous_usage_stats":true}}') is None
    assert with_stream_usage(b'{"stream":false}') is None
    assert json.loads(with_stream_usage(b'{"stream":true}'))["stream_options"] == {"include_usage": True}


def test_stripper_exact_over_every_split_and_both_line_endings():
    for sep in (b"\n\n", b"\r\n\r\n"):
        kept = b'data: {"choices":[{"delta":{"content":"a"}}]}' + sep
        usage = b'data: {"choices":[],"usage":{"prompt_tokens":42,"completion_tokens":1}}' + sep
        done = b"data: [DONE]" + sep
        stream = kept + usage + done
        for cut in range(1, len(stream)):
            st = UsageEventStripper()
            out = st.feed(stream[:cut]) + st.feed(stream[cut:]) + st.finish()
            assert out == kept + done


def test_stripper_passes_content_before_its_event_completes():
    st = UsageEventStripper()
    head = b'data: {"id":"c1","choices":[{"delta":{"content":"hel'
    assert st.feed(head) == head  # a content event: nothing held back, even half of it
    assert st.feed(b'lo"}}]}\n') == b'lo"}}]}\n'
    assert st.feed(b'\ndata: {"id":"c1","choices":[],"usage":{"prompt_tokens":7}}') == b"\n"
    assert st.feed(b"\n\ndata: [DONE]\n\n") == b"data: [DONE]\n\n"
    assert st.finish() == b""


def test_stripper_keeps_comments_and_unknown_events():
    st = UsageEventStripper()
    stream = b": keep-alive\n\nevent: ping\ndata: {}\n\ndata: {\"choices\":[],\"usage\":\"not an object\"}\n\n"
    out = b"".join(st.feed(stream[i:i + 7]) for i in range(0, len(stream), 7)) + st.finish()
    assert out == stream
