"""Protocol v1: validation field by field, round trips, control messages, and a decoder fuzz."""

from __future__ import annotations

import json
import subprocess
import sys

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neod.protocol import (
    PROTOCOL_VERSION,
    Accepted,
    Cancel,
    Delta,
    Error,
    ErrorCode,
    Final,
    Generate,
    Ping,
    Pong,
    ProtocolError,
    Timings,
    Usage,
    decode_control,
    decode_event,
    decode_intake,
    encode,
    encode_control,
    encode_reply,
)


def frame(**fields: object) -> bytes:
    return orjson.dumps({"v": PROTOCOL_VERSION, **fields})


def test_generate_round_trip_keeps_every_field() -> None:
    msg = Generate("r1", prompt="héllo", max_tokens=5, temperature=0.0, top_p=0.5, top_k=3, seed=9,
                   stop=("\n", "END"), stop_token_ids=(7,), ignore_eos=True, stream=False,
                   deadline_s=2.5, priority=-3)
    assert decode_intake(encode(msg)) == msg
    ids = Generate("r2", prompt_token_ids=(1, 2, 3))
    assert decode_intake(encode(ids)) == ids


def test_defaults_and_single_stop_string() -> None:
    msg = decode_intake(frame(type="generate", id="a", prompt="x", stop="END", seed=None))
    assert (msg.max_tokens, msg.temperature, msg.top_p, msg.top_k, msg.seed) == (16, 1.0, 1.0, 0,
                                                                                None)
    assert msg.stop == ("END",) and msg.stream is True and msg.priority == 0


@pytest.mark.parametrize("fields, fragment", [
    ({"prompt": "x", "max_tokens": 0}, "field 'max_tokens' must be an integer in [1,"),
    ({"prompt": "x", "max_tokens": "10"}, "field 'max_tokens' must be an integer"),
    ({"prompt": "x", "max_tokens": True}, "field 'max_tokens' must be an integer"),
    ({"prompt": "x", "temperature": -1}, "field 'temperature' must be a number in [0.0, 100.0]"),
    ({"prompt": "x", "top_p": 0}, "field 'top_p' must be a number in (0.0, 1.0]"),
    ({"prompt": "x", "top_k": -2}, "field 'top_k'"),
    ({"prompt": "x", "seed": 2**63}, "field 'seed'"),
    ({"prompt": "x", "stop": [""]}, "field 'stop' must be a string or a list of non-empty"),
    ({"prompt": "x", "stop": 5}, "field 'stop'"),
    ({"prompt": "x", "stop_token_ids": [-1]}, "field 'stop_token_ids'"),
    ({"prompt": "x", "ignore_eos": 1}, "field 'ignore_eos' must be true or false"),
    ({"prompt": "x", "stream": "yes"}, "field 'stream' must be true or false"),
    ({"prompt": "x", "deadline_s": 0}, "field 'deadline_s'"),
    ({"prompt": "x", "priority": 5000}, "field 'priority' must be an integer in [-1000, 1000]"),
    ({"prompt": 5}, "field 'prompt' must be a string"),
    ({}, "give exactly one of 'prompt'"),
    ({"prompt": "x", "prompt_token_ids": [1]}, "give exactly one of 'prompt'"),
    ({"prompt_token_ids": []}, "must not be empty"),
    ({"prompt_token_ids": [1, "2"]}, "field 'prompt_token_ids' must be a list"),
    ({"prompt": "x", "max_token": 3}, "unknown field(s) 'max_token'"),
])
def test_bad_generate_fields_are_named(fields: dict, fragment: str) -> None:
    with pytest.raises(ProtocolError) as err:
        decode_intake(frame(type="generate", id="req-7", **fields))
    assert err.value.code == ErrorCode.BAD_REQUEST
    assert err.value.request_id == "req-7"
    assert fragment in err.value.message


@pytest.mark.parametrize("raw, fragment", [
    (b"\xff\xfe", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (orjson.dumps({"type": "generate"}), "unsupported protocol version None"),
    (orjson.dumps({"v": 2, "type": "generate"}), "unsupported protocol version 2"),
    (frame(type=3), "field 'type' must be a string"),
    (frame(type="generate", prompt="x"), "field 'id' must be a string"),
    (frame(type="generate", id="", prompt="x"), "field 'id' must be a string of 1 to 128"),
    (frame(type="status"), "unknown message type 'status' on the intake"),
    (frame(type="cancel", id="a", extra=1), "unknown field(s) 'extra'"),
])
def test_malformed_messages(raw: bytes, fragment: str) -> None:
    with pytest.raises(ProtocolError) as err:
        decode_intake(raw)
    assert fragment in err.value.message


def test_cancel_and_ping() -> None:
    assert decode_intake(frame(type="cancel", id="a")) == Cancel("a")
    assert decode_intake(frame(type="ping", nonce="n")) == Ping("n")
    assert decode_intake(frame(type="ping")) == Ping(None)


def test_events_round_trip() -> None:
    final = Final("a", "stop", "END", Usage(3, 4), Timings(1.0, 2.0, 3.0, 4.0), text="hi",
                  token_ids=[1])
    for event in (Accepted("a", 3), Delta("a", 0, "é", [195, 169]), final,
                  Error(None, "bad_request", "why"), Pong("n", "0.1.0", "serving")):
        assert decode_event(encode(event)) == event
    assert orjson.loads(encode(Accepted("a", 3))) == {"v": 1, "type": "accepted", "id": "a",
                                                     "prompt_tokens": 3}
    cut = Final("a", "length", None, Usage(3, 4), Timings(1.0, 2.0, 3.0, 4.0),
                detail="the KV cache cannot hold more of this request")
    assert decode_event(encode(cut)) == cut
    # A daemon that predates `detail` sends none: it reads as null.
    wire = orjson.loads(encode(cut))
    del wire["detail"]
    assert decode_event(orjson.dumps(wire)).detail is None


def test_control_messages() -> None:
    req = decode_control(encode_control("tune", "q1", policy="neo", max_batch_size=8))
    assert (req.command, req.req, req.args) == ("tune", "q1", {"policy": "neo",
                                                               "max_batch_size": 8})
    assert decode_control(encode_control("drain", "q2", exit=True)).args == {"exit": True}
    assert decode_control(encode_control("status", "q3")).args == {}
    with pytest.raises(ProtocolError, match="tune needs at least one of"):
        decode_control(encode_control("tune", "q"))
    with pytest.raises(ProtocolError, match="field 'policy' must be one of auto, gpu-only, neo") \
            as err:
        decode_control(encode_control("tune", "q7", policy="fast"))
    assert err.value.request_id == "q7"  # so the refusal reaches the right caller
    with pytest.raises(ProtocolError, match="field 'max_batch_size' must be an integer"):
        decode_control(encode_control("tune", "q", max_batch_size=0))
    rule = decode_control(encode_control("tune", "q", cpu_min_gain=0, cpu_stretch=0.25)).args
    assert rule == {"cpu_min_gain": 0.0, "cpu_stretch": 0.25}
    with pytest.raises(ProtocolError, match=r"field 'cpu_stretch' must be a number in \[0.0, "):
        decode_control(encode_control("tune", "q", cpu_stretch=-1))
    with pytest.raises(ProtocolError, match="field 'cpu_min_gain' must be a number"):
        decode_control(encode_control("tune", "q", cpu_min_gain="1%"))
    assert decode_control(encode_control("tune", "q", cpu_round_robin=1)).args == {
        "cpu_round_robin": 1
    }
    for bad in (0, 65, 2.5):
        with pytest.raises(ProtocolError, match=r"field 'cpu_round_robin' must be an integer"):
            decode_control(encode_control("tune", "q", cpu_round_robin=bad))
    with pytest.raises(ProtocolError, match="unknown control command 'generate'"):
        decode_control(encode_control("generate", "q"))
    reply = orjson.loads(encode_reply("q", error=ProtocolError(ErrorCode.OVERLOADED, "busy")))
    assert reply == {"v": 1, "type": "reply", "req": "q", "ok": False, "code": "overloaded",
                     "message": "busy"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
field_names = st.sampled_from(["v", "type", "id", "prompt", "prompt_token_ids", "max_tokens",
                               "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
                               "ignore_eos", "stream", "deadline_s", "priority", "nonce", "x"])
messages = st.dictionaries(field_names, json_values, max_size=8).map(
    lambda d: {"v": 1, "type": "generate", "id": "f", **d})


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=64), messages.map(lambda m: json.dumps(m).encode())))
def test_decoder_fuzz_only_raises_protocol_errors(raw: bytes) -> None:
    try:
        msg = decode_intake(raw)
    except ProtocolError as exc:
        assert exc.code == ErrorCode.BAD_REQUEST and exc.message
        return
    assert decode_intake(encode(msg)) == msg  # whatever is accepted is a valid, stable message


def test_protocol_and_client_do_not_import_torch() -> None:
    code = ("import sys, neod.protocol, neod.client, neod.config, neod.cli.ctl; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
