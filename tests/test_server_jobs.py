"""A job's last event from the engine's final output: the engine's kind of failure decides the
error code the producer sees."""

from __future__ import annotations

import pytest

from neod.engine.request import EngineError, FinishReason, RequestOutput
from neod.protocol import Error, Final
from neod.server.jobs import Job
from neod.server.textstream import OutputText
from neod.tokenizer import ByteTokenizer


def job() -> Job:
    text = OutputText(ByteTokenizer().detokenizer([]), ())
    return Job(b"peer", "c1", "e1", False, (), 0.0, 3, text)


@pytest.mark.parametrize("kind,code", [
    (EngineError.PROMPT_TOO_LONG, "prompt_too_long"),  # e.g. queued while the budget was lowered
    (EngineError.INVALID, "bad_request"),
    (EngineError.INTERNAL, "internal"),
    (None, "internal"),
])
def test_an_engine_error_becomes_the_code_of_its_kind(kind, code):
    out = RequestOutput("e1", finished=True, finish_reason=FinishReason.ERROR,
                        error="300 tokens to prefill exceed the token budget", error_kind=kind)
    [event] = job().ending(out, now=1.0)
    assert isinstance(event, Error) and event.code == code and "300 tokens" in event.message


def test_a_length_cut_short_by_the_kv_cache_says_why():
    why = "the KV cache cannot hold more of this request: its KV outgrows the largest pool"
    out = RequestOutput("e1", finished=True, finish_reason=FinishReason.LENGTH, detail=why)
    [final] = job().ending(out, now=1.0)
    assert isinstance(final, Final) and final.finish_reason == "length" and final.detail == why
    plain = RequestOutput("e1", finished=True, finish_reason=FinishReason.LENGTH)
    [final] = job().ending(plain, now=1.0)
    assert final.finish_reason == "length" and final.detail is None
