"""End to end through real ZeroMQ sockets, with the real engine and the tiny model on the CPU.

One daemon serves the whole module (the engine is built once); tests that need other limits start
their own. Every test is bounded in time and checks, at the end, that no KV block is left in use.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import orjson
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import free_port

from neod.client import AsyncClient, Client, ControlClient, DaemonUnavailable, RequestError
from neod.config import Config, load_config
from neod.server.embedded import EmbeddedDaemon

TIMEOUT_S = 30.0


def daemon_config(tmp: Path, **server: object) -> Config:
    overrides = {"model.device": "cpu", "model.preset": "tiny", "scheduler.max_batch_size": 32,
                 "cache.cpu_kv_gib": 0.25,
                 "server.intake_endpoint": f"tcp://127.0.0.1:{free_port()}",
                 "server.control_endpoint": f"ipc://{tmp}/control.sock",
                 "server.max_new_tokens": 4000, "server.max_prompt_tokens": 256}
    overrides.update({f"server.{k}": v for k, v in server.items()})
    return load_config(None, env={}, overrides=overrides)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    with EmbeddedDaemon(daemon_config(tmp_path_factory.mktemp("neod"))) as d:
        yield d


def client(d: EmbeddedDaemon, **kw: object) -> Client:
    return Client(d.intake_endpoint, timeout_s=TIMEOUT_S, **kw)


def status(d: EmbeddedDaemon) -> dict:
    with ControlClient(d.control_endpoint) as c:
        return c.call("status")


def wait_idle(d: EmbeddedDaemon, timeout_s: float = 10.0) -> dict:
    """Wait until nothing is in flight; then every KV block must be free again."""
    deadline = time.monotonic() + timeout_s
    while True:
        st_ = status(d)
        if st_["server"]["active_requests"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert st_["server"]["active_requests"] == 0
    for pool in ("kv_gpu", "kv_cpu"):
        assert st_["engine"][pool]["blocks_used"] == 0, st_["engine"]
    return st_


def byte_text(token_ids: list[int]) -> str:
    return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")


def test_generate_and_stream_agree(daemon: EmbeddedDaemon) -> None:
    with client(daemon) as c:
        full = c.generate("Hello, neod!", max_tokens=24, temperature=0, ignore_eos=True)
        stream = c.stream("Hello, neod!", max_tokens=24, temperature=0, ignore_eos=True)
        deltas = list(stream)
    assert full.finish_reason == "length" and full.final.usage.completion_tokens == 24
    assert full.final.usage.prompt_tokens == len("Hello, neod!") + 1  # BOS
    assert full.text == byte_text(full.token_ids)
    assert [d.index for d in deltas] == [sum(len(x.token_ids) for x in deltas[:i])
                                         for i in range(len(deltas))]
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    assert stream.text == full.text and stream.final.finish_reason == "length"
    t = stream.final.timings
    assert 0 <= t.queue_ms <= t.ttft_ms <= t.total_ms and t.tpot_ms > 0
    wait_idle(daemon)


def test_many_concurrent_clients(daemon: EmbeddedDaemon) -> None:
    async def one_client(n: int) -> list[tuple[int, list[int]]]:
        async with AsyncClient(daemon.intake_endpoint, timeout_s=TIMEOUT_S) as c:
            async def streamed(i: int) -> tuple[int, list[int]]:
                s = await c.stream(f"client {n} request {i}", max_tokens=8 + i, ignore_eos=True,
                                   seed=i)
                indices = [d.index async for d in s]
                assert indices == sorted(indices)
                return s.final.usage.completion_tokens, indices

            async def whole(i: int) -> tuple[int, list[int]]:
                r = await c.generate([1, 2, 3, n, i], max_tokens=8 + i, ignore_eos=True)
                return r.final.usage.completion_tokens, []
            return await asyncio.gather(*(streamed(i) if i % 2 else whole(i) for i in range(6)))

    async def all_clients() -> list:
        return await asyncio.gather(*(one_client(n) for n in range(8)))

    results = asyncio.run(asyncio.wait_for(all_clients(), TIMEOUT_S))
    for per_client in results:
        assert [tokens for tokens, _ in per_client] == [8 + i for i in range(6)]
    st_ = wait_idle(daemon)
    assert st_["server"]["counts"]["accepted"] >= 48


def test_cancel_mid_stream_frees_the_request(daemon: EmbeddedDaemon) -> None:
    with client(daemon) as c:
        stream = c.stream("cancel me", max_tokens=3000, ignore_eos=True)
        got = []
        for delta in stream:
            got.append(delta)
            if len(got) == 3:
                stream.cancel()
        assert stream.final.finish_reason == "cancelled"
        assert 3 <= stream.final.usage.completion_tokens < 3000
        c.cancel("no-such-request")  # a no-op, answered by nothing
        assert c.ping().state == "serving"
    wait_idle(daemon)


def test_deadline_exceeded(daemon: EmbeddedDaemon) -> None:
    with client(daemon) as c:
        start = time.monotonic()
        with pytest.raises(RequestError) as err:
            c.generate("slow", max_tokens=3000, ignore_eos=True, deadline_s=0.3)
        assert err.value.code == "deadline_exceeded" and "deadline_s" in err.value.message
        assert time.monotonic() - start < 5.0
    wait_idle(daemon)


def test_prompt_too_long_and_bad_prompts(daemon: EmbeddedDaemon) -> None:
    limit = status(daemon)["server"]["prompt_limit"]
    with client(daemon) as c:
        with pytest.raises(RequestError) as err:
            c.generate("x" * (limit + 5))
        assert err.value.code == "prompt_too_long" and str(limit) in err.value.message
        assert c.generate("x" * (limit - 1), max_tokens=1).final.usage.prompt_tokens == limit
        with pytest.raises(RequestError, match="bad_request: .*vocabulary"):
            c.generate([1, 2, 10**6])
        with pytest.raises(RequestError, match="max_tokens.*at most 4000"):
            c.generate("x", max_tokens=5000)
    wait_idle(daemon)


def test_stop_strings_and_stop_tokens(daemon: EmbeddedDaemon) -> None:
    with client(daemon) as c:
        base = c.generate("stop test", max_tokens=40, temperature=0, ignore_eos=True)
        printable = [i for i, t in enumerate(base.token_ids) if 32 < t < 127]
        assert len(printable) >= 3, base.token_ids
        stop = chr(base.token_ids[printable[len(printable) // 2]])
        r = c.generate("stop test", max_tokens=40, temperature=0, ignore_eos=True, stop=[stop])
        assert r.finish_reason == "stop" and r.final.stop_reason == stop
        assert r.text == base.text[:base.text.index(stop)]
        token = base.token_ids[5]
        r = c.generate("stop test", max_tokens=40, temperature=0, ignore_eos=True,
                       stop_token_ids=[token])
        assert r.finish_reason == "stop" and r.final.stop_reason == token
        assert r.token_ids == base.token_ids[:base.token_ids.index(token) + 1]
    wait_idle(daemon)


class Raw:
    """A bare DEALER socket, to send what the client library never would."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout_s: float = 10.0) -> dict | None:
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        return orjson.loads(self.sock.recv())

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def test_malformed_frames_get_errors(daemon: EmbeddedDaemon) -> None:
    raw = Raw(daemon.intake_endpoint)
    try:
        cases = [
            ((b"not json",), None, "not valid JSON"),
            ((b"[]",), None, "JSON object"),
            ((b'{"v":1,"type":"generate","id":"a"}', b"extra"), None, "one frame"),
            ((orjson.dumps({"v": 1, "type": "generate", "id": "b", "prompt": "x",
                            "max_tokens": "9"}),), "b", "field 'max_tokens'"),
            ((orjson.dumps({"v": 1, "type": "status"}),), None, "unknown message type 'status'"),
            ((orjson.dumps({"v": 1, "type": "drain", "exit": True}),), None, "unknown message"),
        ]
        for frames, rid, fragment in cases:
            raw.send(*frames)
            event = raw.recv()
            assert event is not None and event["type"] == "error", frames
            assert event["code"] == "bad_request" and event["id"] == rid
            assert fragment in event["message"]
        raw.send(orjson.dumps({"v": 1, "type": "generate", "id": "big",
                               "prompt": "y" * (5 << 20)}))
        assert raw.recv(timeout_s=1.0) is None  # over max_message_bytes: the connection is dropped
    finally:
        raw.close()
    with client(daemon) as c:
        assert c.ping().state == "serving"
        with pytest.raises(RequestError, match="max_message_bytes"):
            c.generate("z" * (5 << 20))  # refused locally, never sent
    wait_idle(daemon)


frame_fields = st.dictionaries(
    st.sampled_from(["id", "prompt", "prompt_token_ids", "max_tokens", "temperature", "top_k",
                     "stop", "stream", "deadline_s", "priority", "junk"]),
    st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(-1, 2), st.text(max_size=6),
              st.lists(st.integers(-1, 600), max_size=4)), max_size=6)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=40),
                 frame_fields.map(lambda f: orjson.dumps({"v": 1, "type": "generate", **f}))))
def test_fuzzed_frames_never_hurt_the_daemon(daemon: EmbeddedDaemon, frame: bytes) -> None:
    raw = Raw(daemon.intake_endpoint)
    try:
        raw.send(frame)
        first = raw.recv()
        assert first is not None and first["type"] in ("error", "accepted")
        if first["type"] == "accepted":
            raw.send(orjson.dumps({"v": 1, "type": "cancel", "id": first["id"]}))
            while (event := raw.recv()) is not None and event["type"] == "delta":
                pass
            assert event is not None and event["type"] in ("final", "error")
        assert raw.recv(timeout_s=0.02) is None  # exactly one answer per request
    finally:
        raw.close()


def test_overload_and_per_client_limit(tmp_path: Path) -> None:
    cfg = daemon_config(tmp_path, max_queued_requests=2, max_inflight_per_client=5)
    with EmbeddedDaemon(cfg) as d:
        raw = Raw(d.intake_endpoint)
        try:
            ids = [f"r{i}" for i in range(30)]
            for rid in ids:
                raw.send(orjson.dumps({"v": 1, "type": "generate", "id": rid, "prompt": rid,
                                       "max_tokens": 4, "ignore_eos": True}))
            ends: dict[str, dict] = {}
            while len(ends) < len(ids):
                event = raw.recv()
                assert event is not None, f"missing ends for {set(ids) - set(ends)}"
                if event["type"] in ("final", "error"):
                    assert event["id"] not in ends
                    ends[event["id"]] = event
            codes = {e.get("code", e.get("finish_reason")) for e in ends.values()}
            assert "overloaded" in codes and "length" in codes
            messages = " ".join(e["message"] for e in ends.values() if e["type"] == "error")
            assert "limit" in messages
        finally:
            raw.close()
        wait_idle(d)


def test_vanished_producer_requests_are_cancelled(daemon: EmbeddedDaemon) -> None:
    raw = Raw(daemon.intake_endpoint)
    for i in range(3):
        raw.send(orjson.dumps({"v": 1, "type": "generate", "id": f"gone{i}", "prompt": "bye",
                               "max_tokens": 3000, "ignore_eos": True}))
    assert raw.recv()["type"] == "accepted"
    raw.close()  # vanish without cancelling
    start = time.monotonic()
    st_ = wait_idle(daemon, timeout_s=5.0)
    assert time.monotonic() - start < 3.0  # noticed at the next token, not after 3000 of them
    assert st_["server"]["producers"] == 0 and st_["server"]["counts"]["producer_gone"] >= 1


def test_control_commands(daemon: EmbeddedDaemon) -> None:
    with ControlClient(daemon.control_endpoint) as ctl, client(daemon) as c:
        st_ = ctl.call("status")
        assert st_["engine"]["model"] and st_["server"]["state"] == "serving"
        assert {"ttft_ms", "tpot_ms", "tokens_per_s", "counts"} <= set(st_["server"])
        applied = ctl.call("tune", max_batch_size=16)["applied"]
        assert applied["max_batch_size"] == 16
        assert ctl.call("status")["engine"]["max_batch_size"] == 16
        with pytest.raises(RequestError) as err:
            ctl.call("tune", policy="fast")
        assert err.value.code == "bad_request" and "policy" in err.value.message
        assert ctl.call("drain")["state"] == "draining"
        with pytest.raises(RequestError) as err:
            c.generate("refused")
        assert err.value.code == "shutting_down"
        assert ctl.call("resume")["state"] == "serving"
        assert c.generate("welcome back", max_tokens=2).final.usage.completion_tokens <= 2
        assert ctl.call("ping")["state"] == "serving"
        ctl.call("tune", max_batch_size=32)
    wait_idle(daemon)


def test_ids_are_unique_per_connection(daemon: EmbeddedDaemon) -> None:
    rid = uuid.uuid4().hex
    raw = Raw(daemon.intake_endpoint)
    try:
        with client(daemon) as other:
            request = {"v": 1, "type": "generate", "id": rid, "prompt": "one", "max_tokens": 3000,
                       "ignore_eos": True}
            raw.send(orjson.dumps(request))
            assert raw.recv()["type"] == "accepted"
            raw.send(orjson.dumps(request))  # the same id again while the first runs
            while (event := raw.recv())["type"] == "delta":
                pass
            assert event["code"] == "bad_request" and "already in use" in event["message"]
            # the same id on another connection is another request
            r = other.generate("two", request_id=rid, max_tokens=2, ignore_eos=True)
            assert r.final.usage.completion_tokens == 2
            with pytest.raises(RequestError, match="already in flight"):
                stream = other.stream("three", request_id="x", max_tokens=50)
                other.stream("four", request_id="x")
            stream.cancel()
            list(stream)
            raw.send(orjson.dumps({"v": 1, "type": "cancel", "id": rid}))
            while (event := raw.recv())["type"] == "delta":
                pass
            assert event["type"] == "final" and event["finish_reason"] == "cancelled"
    finally:
        raw.close()
    wait_idle(daemon)


def test_curve_admits_only_authorized_producers(tmp_path: Path) -> None:
    import zmq.auth

    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(str(keys), "neod")
    client_public, client_secret = zmq.auth.create_certificates(str(keys), "producer")
    _, stranger_secret = zmq.auth.create_certificates(str(keys), "stranger")
    Path(client_public).rename(allowed / "producer.key")
    cfg = daemon_config(tmp_path, curve_secret_key_file=server_secret,
                        curve_authorized_keys_dir=str(allowed))
    with EmbeddedDaemon(cfg) as d:
        with Client(d.intake_endpoint, timeout_s=TIMEOUT_S, curve_server_key_file=server_public,
                    curve_client_key_file=client_secret) as c:
            assert c.generate("secret", max_tokens=2, ignore_eos=True).final.usage \
                .completion_tokens == 2
        for kwargs in ({"curve_server_key_file": server_public,
                        "curve_client_key_file": stranger_secret}, {}):
            with Client(d.intake_endpoint, connect_timeout_s=0.5, **kwargs) as c, \
                    pytest.raises(DaemonUnavailable):
                c.generate("let me in")


def test_the_documented_client_example_runs(daemon: EmbeddedDaemon,
                                            capsys: pytest.CaptureFixture) -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    section = doc[doc.index("## Client library"):]
    code = section[section.index("```python") + len("```python"):section.index("```\n\n")]
    code = code.replace('"tcp://127.0.0.1:7470"', repr(daemon.intake_endpoint))
    exec(compile(code, "docs/protocol.md", "exec"), {"__name__": "__doc_example__"})
    out = capsys.readouterr().out
    assert "refused: bad_request" in out and "cancelled" in out and "[" in out
    wait_idle(daemon)
