"""Producer-side client for neod: synchronous and asyncio, with streaming, timeouts and cancel.

Example (`neod` with no configuration listens on tcp://127.0.0.1:7470); docs/protocol.md has it
as a script::

    import asyncio
    from neod.client import AsyncClient, Client

    with Client("tcp://127.0.0.1:7470", timeout_s=30) as client:
        print(client.generate("The capital of France is", max_tokens=16, temperature=0).text)
        stream = client.stream("Once upon a time", max_tokens=64, stop=["\\n\\n"])
        for delta in stream:
            print(delta.text, end="", flush=True)
        print("\\n", stream.final.finish_reason, stream.final.usage)

    async def main() -> None:
        async with AsyncClient("tcp://127.0.0.1:7470") as client:
            stream = await client.stream("Once upon a time", max_tokens=64)
            received = 0
            async for delta in stream:
                received += 1
                if received == 5:
                    await stream.cancel()  # the stream then ends with reason "cancelled"
            print(stream.final.finish_reason)

    asyncio.run(main())

Requests are validated here with the daemon's own rules before they are sent, so a bad field raises
`RequestError("bad_request", ...)` at once, and an oversized message never reaches the daemon (which
would drop the connection). Several requests may be in flight on one client; events are routed by
request id. A `Client` is for one thread; an `AsyncClient` for one event loop.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import orjson
import zmq
import zmq.asyncio
import zmq.auth

from neod.protocol import (
    PROTOCOL_VERSION,
    Accepted,
    Cancel,
    Delta,
    Error,
    Final,
    Generate,
    Ping,
    Pong,
    ProtocolError,
    decode_event,
    encode,
    encode_control,
)

DEFAULT_INTAKE = "tcp://127.0.0.1:7470"
DEFAULT_MAX_MESSAGE_BYTES = 4 << 20


class NeodError(Exception):
    """Base of the client's errors."""


class DaemonUnavailable(NeodError):
    """No connection to the daemon (not running, wrong endpoint, or CURVE keys refused)."""


class RequestTimeout(NeodError, TimeoutError):
    """The daemon sent nothing for this request within the timeout; the request was cancelled."""


class RequestError(NeodError):
    """The daemon answered with an `error` event; `code` is one of protocol.ErrorCode's values."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass
class Completion:
    id: str
    text: str
    token_ids: list[int]
    final: Final

    @property
    def finish_reason(self) -> str:
        return self.final.finish_reason


@dataclass
class _Tracker:
    """One request's progress through its events; shared by both clients."""

    id: str
    prompt_tokens: int | None = None
    final: Final | None = None
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)

    def feed(self, event: Any) -> Delta | None:
        if isinstance(event, Error):
            raise RequestError(event.code, event.message, event.id)
        if isinstance(event, Accepted):
            self.prompt_tokens = event.prompt_tokens
        elif isinstance(event, Delta):
            self.text_parts.append(event.text)
            self.token_ids.extend(event.token_ids)
            return event
        elif isinstance(event, Final):
            self.final = event
        return None

    @property
    def done(self) -> bool:
        return self.final is not None

    def completion(self) -> Completion:
        assert self.final is not None
        if self.final.text is not None:
            return Completion(self.id, self.final.text, self.final.token_ids or [], self.final)
        return Completion(self.id, "".join(self.text_parts), self.token_ids, self.final)


def _request(prompt: str | list[int], request_id: str | None, stream: bool, params: dict[str, Any],
             max_message_bytes: int) -> tuple[str, bytes]:
    """Validate locally with the daemon's own parser; returns (id, frame)."""
    rid = request_id or uuid.uuid4().hex
    wire: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": Generate.type, "id": rid,
                            "stream": stream}
    wire.update((k, list(v) if isinstance(v, tuple) else v) for k, v in params.items())
    wire["prompt" if isinstance(prompt, str) else "prompt_token_ids"] = \
        prompt if isinstance(prompt, str) else list(prompt)
    try:
        msg = Generate.from_wire(wire)
    except ProtocolError as exc:
        raise RequestError(exc.code.value, exc.message, rid) from None
    frame = encode(msg)
    if len(frame) > max_message_bytes:
        raise RequestError("bad_request", f"the request is {len(frame)} bytes; the daemon "
                                          f"accepts at most {max_message_bytes} "
                                          "(max_message_bytes)", rid)
    return rid, frame


def _dealer(ctx: zmq.Context, endpoint: str, curve_server_key_file: str | None,
            curve_client_key_file: str | None) -> zmq.Socket:
    if endpoint.startswith("ipc://") and not os.path.exists(endpoint[len("ipc://"):]):
        raise DaemonUnavailable(f"no neod socket at {endpoint[len('ipc://'):]}: is neod running, "
                                "and is this its endpoint?")
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing before the connection (and handshake) is up
    if endpoint.startswith("tcp://"):
        sock.setsockopt(zmq.HEARTBEAT_IVL, 5000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 15000)
    if curve_server_key_file:
        server_public, _ = zmq.auth.load_certificate(curve_server_key_file)
        if not curve_client_key_file:
            raise ValueError("CURVE needs the client's secret key file too (curve_client_key_file)")
        public, secret = zmq.auth.load_certificate(curve_client_key_file)
        if secret is None:
            raise ValueError(f"{curve_client_key_file} holds no secret key")
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = \
            server_public, public, secret
    sock.connect(endpoint)
    return sock


def _unreachable(endpoint: str, seconds: float) -> DaemonUnavailable:
    return DaemonUnavailable(f"could not connect to neod at {endpoint} within {seconds:g}s: is it "
                             "running and listening there (and, with CURVE, are the keys right)?")


class Client:
    """Synchronous client. Every wait is bounded by `timeout_s` (time without any event)."""

    def __init__(self, endpoint: str = DEFAULT_INTAKE, *, timeout_s: float = 60.0,
                 connect_timeout_s: float = 5.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 curve_server_key_file: str | None = None,
                 curve_client_key_file: str | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_message_bytes = max_message_bytes
        self._ctx = zmq.Context()
        try:
            self._sock = _dealer(self._ctx, endpoint, curve_server_key_file, curve_client_key_file)
        except BaseException:
            self._ctx.term()
            raise
        self._events: dict[str | None, deque] = defaultdict(deque)
        self._open: set[str | None] = set()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close(0)
        self._ctx.term()

    def _send(self, frame: bytes) -> None:
        if not self._sock.poll(int(self.connect_timeout_s * 1000), zmq.POLLOUT):
            raise _unreachable(self.endpoint, self.connect_timeout_s)
        self._sock.send(frame)

    def _next(self, key: str | None, timeout_s: float) -> Any:
        """The next event for `key`, buffering events of other in-flight requests."""
        queue = self._events[key]
        deadline = time.monotonic() + timeout_s
        while not queue:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                raise RequestTimeout(f"no answer from neod at {self.endpoint} within "
                                     f"{timeout_s:g}s")
            try:
                event = decode_event(self._sock.recv())
            except ProtocolError as exc:
                raise NeodError(f"unreadable event from {self.endpoint}: {exc.message}") from None
            owner = getattr(event, "id", None) if not isinstance(event, Pong) else None
            if owner in self._open or owner == key:
                self._events[owner].append(event)
        return queue.popleft()

    def _start(self, prompt: str | list[int], request_id: str | None, stream: bool,
               params: dict[str, Any]) -> _Tracker:
        rid, frame = _request(prompt, request_id, stream, params, self.max_message_bytes)
        if rid in self._open:
            raise RequestError("bad_request", f"request id {rid!r} is already in flight", rid)
        tracker = _Tracker(rid)
        self._open.add(rid)
        try:
            self._send(frame)
            while tracker.prompt_tokens is None:
                tracker.feed(self._next(rid, self.timeout_s))
        except BaseException:
            self._forget(rid)
            raise
        return tracker

    def _forget(self, rid: str) -> None:
        self._open.discard(rid)
        self._events.pop(rid, None)

    def stream(self, prompt: str | list[int], *, request_id: str | None = None,
               **params: Any) -> Stream:
        """Send a request and return once it is accepted; iterate the result for its deltas."""
        return Stream(self, self._start(prompt, request_id, True, params))

    def generate(self, prompt: str | list[int], *, request_id: str | None = None,
                 **params: Any) -> Completion:
        """Send a request and wait for its whole output."""
        tracker = self._start(prompt, request_id, False, params)
        try:
            while not tracker.done:
                tracker.feed(self._next(tracker.id, self.timeout_s))
        except RequestTimeout:
            self.cancel(tracker.id)
            raise
        finally:
            self._forget(tracker.id)
        return tracker.completion()

    def cancel(self, request_id: str) -> None:
        """Ask the daemon to stop a request; its stream then ends with reason `cancelled`."""
        self._send(encode(Cancel(request_id)))

    def ping(self, timeout_s: float | None = None) -> Pong:
        nonce = uuid.uuid4().hex
        self._open.add(None)
        try:
            self._send(encode(Ping(nonce)))
            deadline = time.monotonic() + (timeout_s or self.timeout_s)
            while True:
                pong = self._next(None, max(0.0, deadline - time.monotonic()))
                if pong.nonce == nonce:
                    return pong
        except RequestTimeout:
            raise DaemonUnavailable(f"neod at {self.endpoint} did not answer a ping") from None
        finally:
            self._open.discard(None)


class Stream:
    """Deltas of one request, in order, as an iterator: iteration may stop and resume, and ends
    after the `final` event (then set) or raises RequestError / RequestTimeout. Iterate to the end
    or `cancel()`: events of an unfinished stream stay buffered in its client."""

    def __init__(self, client: Client, tracker: _Tracker) -> None:
        self._client = client
        self._tracker = tracker
        self.id = tracker.id
        self.prompt_tokens = tracker.prompt_tokens

    @property
    def final(self) -> Final | None:
        return self._tracker.final

    @property
    def text(self) -> str:
        return "".join(self._tracker.text_parts)

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Delta:
        tracker, client = self._tracker, self._client
        try:
            while not tracker.done:
                delta = tracker.feed(client._next(tracker.id, client.timeout_s))
                if delta is not None:
                    return delta
        except RequestTimeout:
            client.cancel(tracker.id)
            client._forget(tracker.id)
            raise
        except RequestError:
            client._forget(tracker.id)
            raise
        client._forget(tracker.id)
        raise StopIteration

    def cancel(self) -> None:
        self._client.cancel(self.id)


class AsyncClient:
    """asyncio client; one reader task routes events to the requests waiting for them."""

    def __init__(self, endpoint: str = DEFAULT_INTAKE, *, timeout_s: float = 60.0,
                 connect_timeout_s: float = 5.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 curve_server_key_file: str | None = None,
                 curve_client_key_file: str | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_message_bytes = max_message_bytes
        self._ctx = zmq.asyncio.Context()
        try:
            self._sock = _dealer(self._ctx, endpoint, curve_server_key_file, curve_client_key_file)
        except BaseException:
            self._ctx.term()
            raise
        self._queues: dict[str | None, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self._sock.close(0)
        self._ctx.term()

    async def _read(self) -> None:
        while True:
            try:
                event = decode_event(await self._sock.recv())
            except ProtocolError as exc:  # not a v1 daemon: every waiting request learns why
                for queue in self._queues.values():
                    queue.put_nowait(NeodError(f"unreadable event from {self.endpoint}: "
                                               f"{exc.message}"))
                continue
            owner = None if isinstance(event, Pong) else getattr(event, "id", None)
            queue = self._queues.get(owner)
            if queue is not None:
                queue.put_nowait(event)

    async def _send(self, frame: bytes) -> None:
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read())
        if not await self._sock.poll(int(self.connect_timeout_s * 1000), zmq.POLLOUT):
            raise _unreachable(self.endpoint, self.connect_timeout_s)
        await self._sock.send(frame)

    async def _next(self, key: str | None) -> Any:
        try:
            event = await asyncio.wait_for(self._queues[key].get(), self.timeout_s)
        except TimeoutError:
            raise RequestTimeout(f"no answer from neod at {self.endpoint} within "
                                 f"{self.timeout_s:g}s") from None
        if isinstance(event, NeodError):
            raise event
        return event

    async def _start(self, prompt: str | list[int], request_id: str | None, stream: bool,
                     params: dict[str, Any]) -> _Tracker:
        rid, frame = _request(prompt, request_id, stream, params, self.max_message_bytes)
        if rid in self._queues:
            raise RequestError("bad_request", f"request id {rid!r} is already in flight", rid)
        tracker = _Tracker(rid)
        self._queues[rid] = asyncio.Queue()
        try:
            await self._send(frame)
            while tracker.prompt_tokens is None:
                tracker.feed(await self._next(rid))
        except BaseException:
            self._queues.pop(rid, None)
            raise
        return tracker

    async def stream(self, prompt: str | list[int], *, request_id: str | None = None,
                     **params: Any) -> AsyncStream:
        return AsyncStream(self, await self._start(prompt, request_id, True, params))

    async def generate(self, prompt: str | list[int], *, request_id: str | None = None,
                       **params: Any) -> Completion:
        tracker = await self._start(prompt, request_id, False, params)
        try:
            while not tracker.done:
                tracker.feed(await self._next(tracker.id))
        except (RequestTimeout, asyncio.CancelledError):
            await self.cancel(tracker.id)
            raise
        finally:
            self._queues.pop(tracker.id, None)
        return tracker.completion()

    async def cancel(self, request_id: str) -> None:
        await self._send(encode(Cancel(request_id)))

    async def ping(self) -> Pong:
        nonce = uuid.uuid4().hex
        self._queues[None] = asyncio.Queue()
        try:
            await self._send(encode(Ping(nonce)))
            while True:
                pong = await self._next(None)
                if pong.nonce == nonce:
                    return pong
        except RequestTimeout:
            raise DaemonUnavailable(f"neod at {self.endpoint} did not answer a ping") from None
        finally:
            self._queues.pop(None, None)


class AsyncStream:
    """The asyncio counterpart of `Stream`."""

    def __init__(self, client: AsyncClient, tracker: _Tracker) -> None:
        self._client = client
        self._tracker = tracker
        self.id = tracker.id
        self.prompt_tokens = tracker.prompt_tokens

    @property
    def final(self) -> Final | None:
        return self._tracker.final

    @property
    def text(self) -> str:
        return "".join(self._tracker.text_parts)

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Delta:
        tracker, client = self._tracker, self._client
        try:
            while not tracker.done:
                delta = tracker.feed(await client._next(tracker.id))
                if delta is not None:
                    return delta
        except (RequestTimeout, asyncio.CancelledError):
            client._queues.pop(tracker.id, None)
            await client.cancel(tracker.id)
            raise
        except RequestError:
            client._queues.pop(tracker.id, None)
            raise
        client._queues.pop(tracker.id, None)
        raise StopAsyncIteration

    async def cancel(self) -> None:
        await self._client.cancel(self.id)


class ControlClient:
    """neoctl's side of the control endpoint: one command, one reply (`call`)."""

    def __init__(self, endpoint: str, *, timeout_s: float = 10.0, connect_timeout_s: float = 3.0,
                 curve_server_key_file: str | None = None,
                 curve_client_key_file: str | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._ctx = zmq.Context()
        try:
            self._sock = _dealer(self._ctx, endpoint, curve_server_key_file, curve_client_key_file)
        except BaseException:
            self._ctx.term()
            raise

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close(0)
        self._ctx.term()

    def call(self, command: str, timeout_s: float | None = None, **args: Any) -> dict[str, Any]:
        """The command's result; RequestError if the daemon refused it."""
        req = uuid.uuid4().hex
        if not self._sock.poll(int(self.connect_timeout_s * 1000), zmq.POLLOUT):
            raise _unreachable(self.endpoint, self.connect_timeout_s)
        self._sock.send(encode_control(command, req, **args))
        wait_s = timeout_s or self.timeout_s
        deadline = time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                raise DaemonUnavailable(f"neod at {self.endpoint} did not answer {command!r} "
                                        f"within {wait_s:g}s")
            reply = orjson.loads(self._sock.recv())
            if isinstance(reply, dict) and reply.get("req") == req:
                break
        if not reply.get("ok"):
            raise RequestError(str(reply.get("code")), str(reply.get("message")))
        return reply.get("result", {})
