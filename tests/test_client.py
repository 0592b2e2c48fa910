"""The client library on its own: local validation, unreachable daemons, timeouts, event routing.

A bare ROUTER socket plays the daemon here, scripted event by event, so the client's routing of
interleaved streams and its cancel-on-timeout are checked exactly.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import zmq
from support import free_port

from neod.client import (
    AsyncClient,
    Client,
    ControlClient,
    DaemonUnavailable,
    NeodError,
    RequestError,
    RequestTimeout,
)
from neod.protocol import Accepted, Delta, Error, Final, Timings, Usage, encode


class FakeDaemon:
    """A ROUTER that records what it receives and answers through `script(peer, message)`."""

    def __init__(self, script: Callable[[zmq.Socket, bytes, dict], None]) -> None:
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.endpoint)
        self.received: list[dict] = []
        self._script = script
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if self.sock.poll(20):
                peer, payload = self.sock.recv_multipart()
                message = orjson.loads(payload)
                self.received.append(message)
                self._script(self.sock, peer, message)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close(0)
        self.ctx.term()


def final(rid: str, n: int) -> Final:
    return Final(rid, "length", None, Usage(1, n), Timings(0.1, 0.2, 0.3, 0.4))


def test_requests_are_validated_before_sending(tmp_path: Path) -> None:
    daemon = FakeDaemon(lambda *a: None)
    try:
        with Client(daemon.endpoint, timeout_s=1, max_message_bytes=4096) as c:
            with pytest.raises(RequestError, match="unknown field.*'temprature'"):
                c.generate("x", temprature=0.5)
            with pytest.raises(RequestError, match="field 'top_p' must be a number"):
                c.generate("x", top_p=2)
            with pytest.raises(RequestError, match="field 'prompt_token_ids' must be a list"):
                c.generate([1, "two"])
            with pytest.raises(RequestError, match="accepts at most 4096"):
                c.generate("y" * 5000)
        time.sleep(0.1)
        assert daemon.received == []  # nothing reached the daemon
    finally:
        daemon.close()


def test_unreachable_daemons_are_reported(tmp_path: Path) -> None:
    with pytest.raises(DaemonUnavailable, match="no neod socket at .*is neod running"):
        Client(f"ipc://{tmp_path}/absent.sock")
    start = time.monotonic()
    with Client(f"tcp://127.0.0.1:{free_port()}", connect_timeout_s=0.3) as c, \
            pytest.raises(DaemonUnavailable, match="could not connect"):
        c.generate("x")
    assert time.monotonic() - start < 3
    with ControlClient(f"tcp://127.0.0.1:{free_port()}", connect_timeout_s=0.3) as ctl, \
            pytest.raises(DaemonUnavailable):
        ctl.call("status")


def test_timeout_cancels_the_request() -> None:
    def accept_only(sock: zmq.Socket, peer: bytes, msg: dict) -> None:
        if msg["type"] == "generate":
            sock.send_multipart([peer, encode(Accepted(msg["id"], 3))])

    daemon = FakeDaemon(accept_only)
    try:
        with Client(daemon.endpoint, timeout_s=0.3) as c:
            with pytest.raises(RequestTimeout):
                c.generate("x", request_id="slow")
            stream = c.stream("y", request_id="slow2")
            with pytest.raises(RequestTimeout):
                list(stream)
        deadline = time.monotonic() + 2
        while len(daemon.received) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [(m["type"], m["id"]) for m in daemon.received] == [
            ("generate", "slow"), ("cancel", "slow"), ("generate", "slow2"), ("cancel", "slow2")]
    finally:
        daemon.close()


def interleaving(sock: zmq.Socket, peer: bytes, msg: dict) -> None:
    """Answer 'b' fully before 'a' has its deltas: the client must route by id."""
    if msg["type"] != "generate":
        return
    rid = msg["id"]
    sock.send_multipart([peer, encode(Accepted(rid, 1))])
    if rid == "b":
        for event in (Delta("b", 0, "B0", [1]), Delta("a", 0, "A0", [2]), Delta("b", 1, "B1", [3]),
                      final("b", 2), Delta("a", 1, "A1", [4]), final("a", 2)):
            sock.send_multipart([peer, encode(event)])


def test_sync_client_routes_interleaved_streams() -> None:
    daemon = FakeDaemon(interleaving)
    try:
        with Client(daemon.endpoint, timeout_s=2) as c:
            a = c.stream("a", request_id="a")
            b = c.stream("b", request_id="b")
            assert next(a).text == "A0"  # a stream may be read in parts
            assert [d.text for d in b] == ["B0", "B1"] and b.final.usage.completion_tokens == 2
            assert [d.text for d in a] == ["A1"] and a.text == "A0A1"
            assert a.final.finish_reason == "length" and list(a) == []
    finally:
        daemon.close()


def test_async_client_routes_interleaved_streams_and_errors() -> None:
    def script(sock: zmq.Socket, peer: bytes, msg: dict) -> None:
        if msg.get("id") == "bad":
            sock.send_multipart([peer, encode(Error("bad", "overloaded", "queue full"))])
        elif msg["type"] == "ping":
            sock.send_multipart([peer, orjson.dumps({"v": 1, "type": "pong", "nonce": msg["nonce"],
                                                     "version": "x", "state": "serving"})])
        else:
            interleaving(sock, peer, msg)

    async def scenario(endpoint: str) -> None:
        async with AsyncClient(endpoint, timeout_s=2) as c:
            assert (await c.ping()).state == "serving"
            a = await c.stream("a", request_id="a")
            b = await c.generate("b", request_id="b")
            assert b.text == "B0B1" and b.token_ids == [1, 3]
            assert [d.text async for d in a] == ["A0", "A1"]
            with pytest.raises(RequestError) as err:
                await c.generate("x", request_id="bad")
            assert err.value.code == "overloaded" and err.value.message == "queue full"

    daemon = FakeDaemon(script)
    try:
        asyncio.run(asyncio.wait_for(scenario(daemon.endpoint), 10))
    finally:
        daemon.close()


def test_a_daemon_speaking_another_version_is_an_error_not_a_hang() -> None:
    def v2(sock: zmq.Socket, peer: bytes, msg: dict) -> None:
        sock.send_multipart([peer, orjson.dumps({"v": 2, "type": "pong"})])

    async def ping(endpoint: str) -> None:
        async with AsyncClient(endpoint, timeout_s=5) as c:
            with pytest.raises(NeodError, match="unsupported protocol version 2"):
                await c.ping()

    daemon = FakeDaemon(v2)
    try:
        with Client(daemon.endpoint, timeout_s=5) as c, \
                pytest.raises(NeodError, match="unsupported protocol version 2"):
            c.ping()
        asyncio.run(asyncio.wait_for(ping(daemon.endpoint), 10))
    finally:
        daemon.close()
