"""Request-facing value types shared by the engine and the server.

`SamplingParams` is validated once, when built, so that nothing downstream has to re-check it.
`RequestOutput` is what one engine iteration reports per request: the new tokens, and once, the end.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(enum.StrEnum):
    STOP = "stop"  # a stop token (EOS unless ignore_eos, or one of stop_token_ids) was sampled
    LENGTH = "length"  # max_tokens reached, or the model's context is full
    ABORT = "abort"  # cancelled by the client, a deadline or shutdown
    ERROR = "error"  # the engine could not serve it; RequestOutput.error says why


class EngineError(enum.StrEnum):
    """What kind of failure a FinishReason.ERROR is, for the server's error code."""

    PROMPT_TOO_LONG = "prompt_too_long"  # over the limits in force (which a retune may lower)
    INVALID = "invalid"  # refused as given (empty prompt, token ids, a duplicate request id)
    INTERNAL = "internal"  # the engine failed (a step that raised, a device error)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None  # per-request generator; None draws from the engine's generator
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None  # set only with FinishReason.ERROR
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error_kind: EngineError | None = None  # set only with FinishReason.ERROR
    detail: str | None = None  # with FinishReason.LENGTH: why it ended before its max_tokens
