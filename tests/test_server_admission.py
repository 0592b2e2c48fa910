"""Admission checks on their own: limits, prompt length and vocabulary, sampling parameters."""

from __future__ import annotations

from neod.config import ServerConfig
from neod.engine.request import SamplingParams
from neod.protocol import ErrorCode, Generate
from neod.server.admission import limits_error, prompt_error, prompt_limit, sampling_params

INFO = {"max_model_len": 100, "max_prefill_tokens": 64, "vocab_size": 300}


def test_limits() -> None:
    srv = ServerConfig(max_new_tokens=50, max_stop_strings=2)
    assert limits_error(Generate("a", prompt="x", max_tokens=50, stop=("a", "b")), srv) is None
    code, message = limits_error(Generate("a", prompt="x", max_tokens=51), srv)
    assert code == ErrorCode.BAD_REQUEST and "at most 50" in message
    code, message = limits_error(Generate("a", prompt="x", stop=("a", "b", "c")), srv)
    assert code == ErrorCode.BAD_REQUEST and "3 stop strings" in message


def test_prompt_limit_is_the_tightest_of_context_batch_and_config() -> None:
    assert prompt_limit(INFO, ServerConfig()) == 64  # one prefill batch
    assert prompt_limit({**INFO, "max_prefill_tokens": 8192}, ServerConfig()) == 99  # context - 1
    assert prompt_limit(INFO, ServerConfig(max_prompt_tokens=10)) == 10


def test_prompt_errors() -> None:
    srv = ServerConfig()
    assert prompt_error([1] * 64, INFO, srv) is None
    assert prompt_error([], INFO, srv) == (ErrorCode.BAD_REQUEST, "the prompt is empty")
    code, message = prompt_error([1] * 65, INFO, srv)
    assert code == ErrorCode.PROMPT_TOO_LONG and "65 tokens; at most 64" in message
    assert "scheduler.max_tokens_in_batch, or in chunks" in message  # the binding bound named
    code, message = prompt_error([1] * 100, {**INFO, "max_prefill_tokens": 8192}, srv)
    assert "at most 99" in message and "context of 100 tokens" in message
    code, message = prompt_error([1] * 11, INFO, ServerConfig(max_prompt_tokens=10))
    assert "at most 10" in message and "server.max_prompt_tokens" in message
    code, message = prompt_error([1, 300], INFO, srv)
    assert code == ErrorCode.BAD_REQUEST and "outside the vocabulary [0, 300)" in message


def test_sampling_params_follow_the_engines_validation() -> None:
    params = sampling_params(Generate("a", prompt="x", max_tokens=3, temperature=0.0, seed=4,
                                      stop_token_ids=(7,), ignore_eos=True))
    assert params == SamplingParams(max_tokens=3, temperature=0.0, seed=4, stop_token_ids=(7,),
                                    ignore_eos=True)
    code, message = sampling_params(Generate("a", prompt="x", top_p=0.0))  # not from the wire
    assert code == ErrorCode.BAD_REQUEST and "top_p" in message
