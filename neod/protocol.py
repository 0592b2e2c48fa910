"""Wire protocol v1: every message on neod's sockets, typed and validated, in one place.

Each message is one ZeroMQ frame holding one JSON object (orjson) with `v` (the protocol version)
and `type`. Inbound messages are checked field by field before anything uses them: unknown fields,
wrong types and out-of-range values are `bad_request` errors that name the field, so a producer
learns what to fix and a v2 field sent to a v1 daemon is refused rather than silently ignored.
Nothing received is ever unpickled or evaluated. docs/protocol.md is the prose version of this file.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson

from neod.config import MAX_CPU_ROUND_ROBIN, POLICIES

PROTOCOL_VERSION = 1
MAX_ID_CHARS = 128
MAX_STOP_CHARS = 256
MAX_PRIORITY = 1000


class ErrorCode(enum.StrEnum):
    BAD_REQUEST = "bad_request"  # malformed message or field; fix the request
    PROMPT_TOO_LONG = "prompt_too_long"  # shorten the prompt (the message gives the limit)
    OVERLOADED = "overloaded"  # queue or per-client limit reached; retry later or elsewhere
    SHUTTING_DOWN = "shutting_down"  # the daemon is draining; retry on another instance
    DEADLINE_EXCEEDED = "deadline_exceeded"  # the request's deadline passed before it finished
    CANCELLED = "cancelled"  # ended by the daemon or an operator, not by the producer
    INTERNAL = "internal"  # a bug or a device failure; the daemon logged the details


class ProtocolError(Exception):
    """A message that cannot be served; becomes an `error` event with this code and message."""

    def __init__(self, code: ErrorCode, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


def _bad(message: str, request_id: str | None = None) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message, request_id)


def _show(value: Any) -> str:
    text = repr(value)
    return (text[:60] + "...") if len(text) > 60 else text


class _Fields:
    """Reads one inbound object's fields, checking each and remembering which were used."""

    def __init__(self, obj: dict[str, Any], request_id: str | None) -> None:
        self.obj = obj
        self.request_id = request_id
        self.used = {"v", "type"} if request_id is None else {"v", "type", "id"}

    def take(self, name: str, default: Any) -> Any:
        self.used.add(name)
        value = self.obj.get(name, default)
        return default if value is None else value

    def fail(self, name: str, expected: str, value: Any) -> ProtocolError:
        return _bad(f"field {name!r} must be {expected}; got {_show(value)}", self.request_id)

    def integer(self, name: str, default: int | None, lo: int, hi: int) -> int | None:
        value = self.take(name, default)
        if value is default:
            return value
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise self.fail(name, f"an integer in [{lo}, {hi}]", value)
        return value

    def number(self, name: str, default: float | None, lo: float, hi: float,
               lo_open: bool = False) -> float | None:
        value = self.take(name, default)
        if value is default:
            return value
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok:
            ok = (lo < value if lo_open else lo <= value) and value <= hi
        if not ok:
            raise self.fail(name, f"a number in {'(' if lo_open else '['}{lo}, {hi}]", value)
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.take(name, default)
        if not isinstance(value, bool):
            raise self.fail(name, "true or false", value)
        return value

    def string(self, name: str, default: str | None, max_chars: int) -> str | None:
        value = self.take(name, default)
        if value is default:
            return value
        if not isinstance(value, str) or len(value) > max_chars:
            raise self.fail(name, f"a string of at most {max_chars} characters", value)
        return value

    def int_list(self, name: str, lo: int, hi: int, max_items: int) -> tuple[int, ...] | None:
        value = self.take(name, None)
        if value is None:
            return None
        if not isinstance(value, list) or len(value) > max_items or any(
                not isinstance(t, int) or isinstance(t, bool) or not lo <= t <= hi for t in value):
            raise self.fail(name, f"a list of at most {max_items} integers in [{lo}, {hi}]", value)
        return tuple(value)

    def finish(self) -> None:
        extra = sorted(set(self.obj) - self.used)
        if extra:
            raise _bad(f"unknown field(s) {', '.join(map(repr, extra))} in a {self.obj['type']!r} "
                       f"message (protocol v{PROTOCOL_VERSION})", self.request_id)


def _parse_object(frame: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"message is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _bad("message must be a JSON object")
    if obj.get("v") != PROTOCOL_VERSION:
        raise _bad(f"unsupported protocol version {_show(obj.get('v'))}; this daemon speaks "
                   f"v{PROTOCOL_VERSION} (set \"v\": {PROTOCOL_VERSION})")
    if not isinstance(obj.get("type"), str):
        raise _bad("field 'type' must be a string")
    return obj


def _request_id(obj: dict[str, Any]) -> str:
    rid = obj.get("id")
    if not isinstance(rid, str) or not 1 <= len(rid) <= MAX_ID_CHARS:
        raise _bad(f"field 'id' must be a string of 1 to {MAX_ID_CHARS} characters; "
                   f"got {_show(rid)}")
    return rid


# ---- producer -> daemon (intake) ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Generate:
    type: ClassVar[str] = "generate"
    id: str  # chosen by the producer; unique among its unfinished requests
    prompt: str | None = None  # text, tokenized by the daemon (BOS added as the model expects)
    prompt_token_ids: tuple[int, ...] | None = None  # or token ids, used as given
    max_tokens: int = 16  # most tokens to generate
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass, (0, 1]
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None  # per-request sampling seed, for reproducible samples
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence of any of these
    stop_token_ids: tuple[int, ...] = ()  # generation ends at any of these tokens (kept in output)
    ignore_eos: bool = False  # keep generating past the model's end-of-sequence token
    stream: bool = True  # send `delta` events; false = the text comes in the `final` event only
    deadline_s: float | None = None  # seconds after receipt; then `deadline_exceeded`
    priority: int = 0  # higher starts first among requests waiting to start, [-1000, 1000]

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Generate:
        rid = _request_id(obj)
        f = _Fields(obj, rid)
        prompt = f.string("prompt", None, 1 << 30)
        token_ids = f.int_list("prompt_token_ids", 0, 2**31 - 1, 1 << 24)
        if (prompt is None) == (token_ids is None):
            raise _bad("give exactly one of 'prompt' (text) and 'prompt_token_ids' "
                       "(list of ints)", rid)
        if token_ids is not None and not token_ids:
            raise _bad("field 'prompt_token_ids' must not be empty", rid)
        stop = f.take("stop", ())
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list | tuple) or any(
                not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS for s in stop):
            raise f.fail("stop", f"a string or a list of non-empty strings of at most "
                                  f"{MAX_STOP_CHARS} characters", stop)
        msg = cls(
            id=rid, prompt=prompt, prompt_token_ids=token_ids,
            max_tokens=f.integer("max_tokens", 16, 1, 2**31 - 1),
            temperature=f.number("temperature", 1.0, 0.0, 100.0),
            top_p=f.number("top_p", 1.0, 0.0, 1.0, lo_open=True),
            top_k=f.integer("top_k", 0, 0, 2**31 - 1),
            seed=f.integer("seed", None, 0, 2**63 - 1),
            stop=tuple(stop),
            stop_token_ids=f.int_list("stop_token_ids", 0, 2**31 - 1, 1024) or (),
            ignore_eos=f.boolean("ignore_eos", False),
            stream=f.boolean("stream", True),
            deadline_s=f.number("deadline_s", None, 0.0, 30 * 86400.0, lo_open=True),
            priority=f.integer("priority", 0, -MAX_PRIORITY, MAX_PRIORITY),
        )
        f.finish()
        return msg

    def to_wire(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": self.type, "id": self.id}
        if self.prompt is not None:
            obj["prompt"] = self.prompt
        else:
            obj["prompt_token_ids"] = list(self.prompt_token_ids or ())
        obj.update(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                   top_k=self.top_k, seed=self.seed, stop=list(self.stop),
                   stop_token_ids=list(self.stop_token_ids), ignore_eos=self.ignore_eos,
                   stream=self.stream, deadline_s=self.deadline_s, priority=self.priority)
        return obj


@dataclass(frozen=True, slots=True)
class Cancel:
    type: ClassVar[str] = "cancel"
    id: str  # the request to cancel; its stream ends with a `final` of reason `cancelled`

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Cancel:
        rid = _request_id(obj)
        _Fields(obj, rid).finish()
        return cls(rid)

    def to_wire(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "type": self.type, "id": self.id}


@dataclass(frozen=True, slots=True)
class Ping:
    type: ClassVar[str] = "ping"
    nonce: str | None = None  # echoed in the `pong`

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Ping:
        f = _Fields(obj, None)
        nonce = f.string("nonce", None, MAX_ID_CHARS)
        f.finish()
        return cls(nonce)

    def to_wire(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "type": self.type, "nonce": self.nonce}


IntakeMessage = Generate | Cancel | Ping
_INTAKE: dict[str, Any] = {m.type: m for m in (Generate, Cancel, Ping)}


def decode_intake(frame: bytes) -> IntakeMessage:
    """Parse and validate one producer message; raises ProtocolError (with the id when known)."""
    obj = _parse_object(frame)
    cls = _INTAKE.get(obj["type"])
    if cls is None:
        rid = obj.get("id") if isinstance(obj.get("id"), str) else None
        raise _bad(f"unknown message type {_show(obj['type'])} on the intake; "
                   f"expected one of {', '.join(_INTAKE)}", rid)
    return cls.from_wire(obj)


# ---- daemon -> producer (events) ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Accepted:
    type: ClassVar[str] = "accepted"
    id: str
    prompt_tokens: int  # prompt length after tokenization


@dataclass(frozen=True, slots=True)
class Delta:
    type: ClassVar[str] = "delta"
    id: str
    index: int  # position of token_ids[0] in the output; deltas arrive in order, without gaps
    text: str  # new text; never splits a UTF-8 character; may be empty while bytes are pending
    token_ids: list[int]  # new token ids


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Timings:
    queue_ms: float  # receipt -> handed to the engine
    ttft_ms: float  # receipt -> first token sent (0 if none)
    tpot_ms: float  # mean time per output token after the first (0 with fewer than 2)
    total_ms: float  # receipt -> this event


@dataclass(frozen=True, slots=True)
class Final:
    type: ClassVar[str] = "final"
    id: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    stop_reason: str | int | None  # the stop string or stop token id that ended it, else null
    usage: Usage
    timings: Timings
    text: str | None = None  # whole output text, only when the request set stream=false
    token_ids: list[int] | None = None  # whole output, only when stream=false
    detail: str | None = None  # why a `length` ended before max_tokens (the KV cache is full)


@dataclass(frozen=True, slots=True)
class Error:
    type: ClassVar[str] = "error"
    id: str | None  # null when the message could not be tied to a request
    code: str  # an ErrorCode value
    message: str  # what happened and what to do about it


@dataclass(frozen=True, slots=True)
class Pong:
    type: ClassVar[str] = "pong"
    nonce: str | None
    version: str  # neod's version
    state: str  # "serving" | "draining"


Event = Accepted | Delta | Final | Error | Pong
FINISH_REASONS = ("stop", "length", "cancelled")


def encode(message: Any) -> bytes:
    """One event or request as a frame (dataclass fields plus `v` and `type`)."""
    if hasattr(message, "to_wire"):
        return orjson.dumps(message.to_wire())
    obj = {"v": PROTOCOL_VERSION, "type": message.type}
    obj.update((name, getattr(message, name)) for name in message.__slots__)
    return orjson.dumps(obj)


def decode_event(frame: bytes) -> Event:
    """Parse one daemon event (client side); ProtocolError if the daemon does not speak v1."""
    obj = _parse_object(frame)
    kind = obj.pop("type")
    obj.pop("v")
    try:
        if kind == "final":
            obj["usage"] = Usage(**obj["usage"])
            obj["timings"] = Timings(**obj["timings"])
        return _EVENTS[kind](**obj)
    except (KeyError, TypeError) as exc:
        raise _bad(f"malformed {kind!r} event from the daemon: {exc}") from None


_EVENTS: dict[str, Any] = {e.type: e for e in (Accepted, Delta, Final, Error, Pong)}


# ---- neoctl <-> daemon (control endpoint) ------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ControlRequest:
    command: str  # one of CONTROL_COMMANDS
    req: str  # correlation id, echoed in the reply
    args: dict[str, Any] = field(default_factory=dict)  # validated per command


_TUNE_KNOBS = ("policy", "max_batch_size", "max_tokens_in_batch", "cpu_threads", "cpu_min_gain",
               "cpu_stretch", "cpu_round_robin")
# A tune that resizes the CPU pool may measure the pool again (its CPU side of the profile):
# the daemon waits this long for the engine, and neoctl a little longer for the reply.
CPU_RETUNE_TIMEOUT_S = 300.0
CONTROL_COMMANDS = ("status", "tune", "drain", "resume", "ping")


def decode_control(frame: bytes) -> ControlRequest:
    """Parse one neoctl command; a ProtocolError carries the command's `req` in `request_id`."""
    obj = _parse_object(frame)
    req = obj.get("req") if isinstance(obj.get("req"), str) else None
    try:
        return _control_fields(obj)
    except ProtocolError as exc:
        exc.request_id = req
        raise


def _control_fields(obj: dict[str, Any]) -> ControlRequest:
    command = obj["type"]
    if command not in CONTROL_COMMANDS:
        raise _bad(f"unknown control command {_show(command)}; expected one of "
                   f"{', '.join(CONTROL_COMMANDS)}")
    f = _Fields(obj, None)
    req = f.string("req", "", MAX_ID_CHARS)
    args: dict[str, Any] = {}
    if command == "tune":
        policy = f.string("policy", None, 32)
        if policy is not None and policy not in POLICIES:
            raise f.fail("policy", "one of " + ", ".join(POLICIES), policy)
        knobs = (("policy", policy),
                 ("max_batch_size", f.integer("max_batch_size", None, 1, 1 << 20)),
                 ("max_tokens_in_batch", f.integer("max_tokens_in_batch", None, 1, 1 << 24)),
                 ("cpu_threads", f.integer("cpu_threads", None, 1, 4096)),
                 ("cpu_min_gain", f.number("cpu_min_gain", None, 0.0, 1.0)),
                 ("cpu_stretch", f.number("cpu_stretch", None, 0.0, 100.0)),
                 ("cpu_round_robin", f.integer("cpu_round_robin", None, 1, MAX_CPU_ROUND_ROBIN)))
        args = {name: value for name, value in knobs if value is not None}
        if not args:
            raise _bad(f"tune needs at least one of {', '.join(_TUNE_KNOBS)}")
    elif command == "drain":
        args["exit"] = f.boolean("exit", False)
    f.finish()
    return ControlRequest(command, req or "", args)


def encode_control(command: str, req: str, **args: Any) -> bytes:
    return orjson.dumps({"v": PROTOCOL_VERSION, "type": command, "req": req, **args})


def encode_reply(req: str, result: dict[str, Any] | None = None,
                 error: ProtocolError | None = None) -> bytes:
    obj: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": "reply", "req": req, "ok": error is None}
    if error is None:
        obj["result"] = result or {}
    else:
        obj["code"], obj["message"] = error.code.value, error.message
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)
