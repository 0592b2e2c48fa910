"""Admission checks that depend only on the request, the configuration and the model.

Pure functions, so each refusal and its message can be tested without sockets or an engine. The
checks that depend on the server's state (draining, duplicate ids, queue and per-producer limits)
stay with the server.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from neod.config import ServerConfig
from neod.engine.request import SamplingParams
from neod.protocol import ErrorCode, Generate

Refusal = tuple[ErrorCode, str]

# What the server needs from engine.stats() (docs/architecture.md, "Engine API").
REQUIRED_MODEL_INFO = ("max_model_len", "max_prefill_tokens", "vocab_size")


def limits_error(msg: Generate, srv: ServerConfig) -> Refusal | None:
    """The daemon's own caps on what one request may ask for."""
    if msg.max_tokens > srv.max_new_tokens:
        return ErrorCode.BAD_REQUEST, (f"field 'max_tokens' is {msg.max_tokens}; this daemon "
                                       f"allows at most {srv.max_new_tokens}")
    if len(msg.stop) > srv.max_stop_strings:
        return ErrorCode.BAD_REQUEST, (f"{len(msg.stop)} stop strings given; at most "
                                       f"{srv.max_stop_strings} allowed")
    return None


def prompt_limit(model_info: Mapping[str, Any], srv: ServerConfig) -> int:
    """Longest prompt: the engine's (context minus one token, what it can prefill), narrowed by
    [server] max_prompt_tokens."""
    return min(_prompt_limits(model_info, srv).values())


def _prompt_limits(model_info: Mapping[str, Any], srv: ServerConfig) -> dict[str, int]:
    """Each bound on the prompt's length, by what sets it."""
    limits = {
        f"the model's context of {model_info['max_model_len']} tokens, less one to generate":
            model_info["max_model_len"] - 1,
        "scheduler.max_tokens_in_batch, or in chunks the GPU KV pool":
            model_info["max_prefill_tokens"],
    }
    if srv.max_prompt_tokens:
        limits["server.max_prompt_tokens"] = srv.max_prompt_tokens
    return limits


def prompt_error(token_ids: list[int], model_info: Mapping[str, Any],
                 srv: ServerConfig) -> Refusal | None:
    if not token_ids:
        return ErrorCode.BAD_REQUEST, "the prompt is empty"
    bound, limit = min(_prompt_limits(model_info, srv).items(), key=lambda kv: kv[1])
    if len(token_ids) > limit:
        return ErrorCode.PROMPT_TOO_LONG, (
            f"the prompt has {len(token_ids)} tokens; at most {limit} are accepted ({bound}); "
            "shorten it")
    vocab = model_info["vocab_size"]
    if max(token_ids) >= vocab:
        return ErrorCode.BAD_REQUEST, (f"prompt token id {max(token_ids)} is outside the "
                                       f"vocabulary [0, {vocab})")
    return None


def sampling_params(msg: Generate) -> SamplingParams | Refusal:
    """The engine's parameters, or the refusal if the engine's own validation rejects them."""
    try:
        return SamplingParams(max_tokens=msg.max_tokens, temperature=msg.temperature,
                              top_p=msg.top_p, top_k=msg.top_k, seed=msg.seed,
                              stop_token_ids=msg.stop_token_ids, ignore_eos=msg.ignore_eos)
    except ValueError as exc:
        return ErrorCode.BAD_REQUEST, str(exc)
