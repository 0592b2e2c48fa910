"""One accepted generate request as the server tracks it, from `accepted` to its last event.

A job is reported to its producer exactly once at the end (a `final` or an `error`); `closed`
records that. It stays in the server's tables until the engine reports it finished too, so every
request the engine holds is accounted for (its KV blocks are free once that report arrives).
`abort_cause` says who ended it early and therefore which event the end becomes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from neod.engine.request import EngineError, FinishReason, RequestOutput
from neod.protocol import Delta, Error, ErrorCode, Final, Timings, Usage
from neod.server.textstream import OutputText

# Abort causes besides the ErrorCodes (deadline_exceeded, shutting_down, cancelled, internal).
CAUSE_CANCEL = "cancel"  # the producer sent `cancel`: final with reason "cancelled"
CAUSE_STOP_STRING = "stop_string"  # a stop string matched: final with reason "stop"
CAUSE_CLIENT_GONE = "client_gone"  # the producer vanished: nothing to send


@dataclass(eq=False, slots=True)
class Job:
    peer: bytes
    client_id: str
    engine_id: str
    stream: bool
    stop_token_ids: tuple[int, ...]
    received: float  # time.monotonic() of receipt
    prompt_tokens: int
    text: OutputText
    admitted: float | None = None  # handed to the engine
    first_token: float | None = None
    last_token: float | None = None
    num_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # kept only when not streaming
    text_parts: list[str] = field(default_factory=list)  # kept only when not streaming
    last_token_id: int | None = None
    abort_cause: str | None = None
    closed: bool = False
    deadline: asyncio.TimerHandle | None = None

    def take_tokens(self, token_ids: list[int], now: float) -> Delta | None:
        """Record new tokens; the delta to stream, if the producer asked for a stream."""
        if self.first_token is None:
            self.first_token = now
        self.last_token = now
        self.last_token_id = token_ids[-1]
        index = self.num_tokens
        self.num_tokens += len(token_ids)
        text = self.text.feed(token_ids)
        if self.stream:
            return Delta(self.client_id, index, text, token_ids)
        self.token_ids.extend(token_ids)
        self.text_parts.append(text)
        return None

    def timings(self, now: float) -> Timings:
        def ms(t: float) -> float:
            return round(t * 1000.0, 3)
        tpot = 0.0
        if self.num_tokens > 1 and self.first_token is not None and self.last_token is not None:
            tpot = (self.last_token - self.first_token) / (self.num_tokens - 1)
        return Timings(
            queue_ms=ms((self.admitted if self.admitted is not None else now) - self.received),
            ttft_ms=ms(self.first_token - self.received) if self.first_token is not None else 0.0,
            tpot_ms=ms(tpot),
            total_ms=ms(now - self.received))

    def ending(self, out: RequestOutput | None, now: float) -> list[Delta | Final | Error]:
        """The last events for this job given the engine's finished output (None: ended by neod)."""
        cause = self.abort_cause
        if cause == CAUSE_CLIENT_GONE:
            return []
        if cause is not None and cause not in (CAUSE_CANCEL, CAUSE_STOP_STRING):
            return [Error(self.client_id, cause, _CAUSE_MESSAGES.get(cause, cause))]
        if cause is None and out is not None and out.finish_reason == FinishReason.ERROR:
            if out.error_kind == EngineError.PROMPT_TOO_LONG:  # the limits in force when scheduled
                return [Error(self.client_id, ErrorCode.PROMPT_TOO_LONG.value, out.error or "")]
            if out.error_kind == EngineError.INVALID:
                return [Error(self.client_id, ErrorCode.BAD_REQUEST.value, out.error or "")]
            return [Error(self.client_id, ErrorCode.INTERNAL.value,
                          f"the engine failed this request: {out.error}")]
        if cause is None and out is not None and out.finish_reason == FinishReason.ABORT:
            return [Error(self.client_id, ErrorCode.CANCELLED.value,
                          "the engine aborted this request")]
        events: list[Delta | Final | Error] = []
        tail = self.text.finish() if cause != CAUSE_CANCEL else ""
        if self.stream and tail:
            events.append(Delta(self.client_id, self.num_tokens, tail, []))
        elif tail:
            self.text_parts.append(tail)
        reason, stop_reason = self._reason(cause, out)
        events.append(Final(
            self.client_id, reason, stop_reason,
            Usage(self.prompt_tokens, self.num_tokens), self.timings(now),
            text=None if self.stream else "".join(self.text_parts),
            token_ids=None if self.stream else self.token_ids,
            detail=out.detail if out is not None and reason == "length" else None))
        return events

    def _reason(self, cause: str | None, out: RequestOutput | None) -> tuple[str, str | int | None]:
        if cause == CAUSE_CANCEL:
            return "cancelled", None
        if self.text.stopped_by is not None:
            return "stop", self.text.stopped_by
        if out is not None and out.finish_reason == FinishReason.LENGTH:
            return "length", None
        if self.last_token_id is not None and self.last_token_id in self.stop_token_ids:
            return "stop", self.last_token_id
        return "stop", None  # the model's end-of-sequence token


_CAUSE_MESSAGES = {
    ErrorCode.DEADLINE_EXCEEDED.value: "the request's deadline passed before it finished; "
                                       "raise deadline_s or retry when the daemon is less busy",
    ErrorCode.SHUTTING_DOWN.value: "neod shut down before this request finished; retry it on "
                                   "another instance or after the restart",
    ErrorCode.CANCELLED.value: "an operator cancelled this request",
    ErrorCode.INTERNAL.value: "neod or its engine failed while serving this request (the "
                              "daemon's log has the details); retry it",
}
