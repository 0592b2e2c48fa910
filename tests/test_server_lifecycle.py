"""Daemon lifecycle with a scripted engine: failures, drain and grace, sd_notify and the watchdog.

The real engine cannot be made to raise in a step or hang on demand; this double can. Everything
else (sockets, server, client) is the real thing.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from neod.client import Client, ControlClient, RequestError
from neod.config import load_config
from neod.engine.request import FinishReason, RequestOutput, SamplingParams
from neod.server.embedded import EmbeddedDaemon
from neod.server.sdnotify import SystemdNotifier


class Double:
    """One token per step; `fail_next` makes steps raise, `hang` blocks the step."""

    def __init__(self, step_s: float = 0.002, load_s: float = 0.0) -> None:
        time.sleep(load_s)
        self.step_s = step_s
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.running: dict[str, list] = {}
        self.fail_next = 0
        self.hang = threading.Event()
        self.release = threading.Event()

    def add_request(self, rid: str, ids: list[int], params: SamplingParams) -> None:
        self.inbox.put(("add", rid, params))

    def abort_request(self, rid: str) -> None:
        self.inbox.put(("abort", rid, None))

    def has_unfinished(self) -> bool:
        return bool(self.running) or not self.inbox.empty()

    def step(self) -> list[RequestOutput]:
        out = []
        while not self.inbox.empty():
            op, rid, params = self.inbox.get()
            if op == "add":
                self.running[rid] = [params, 0]
            elif self.running.pop(rid, None) is not None:
                out.append(RequestOutput(rid, finished=True, finish_reason=FinishReason.ABORT))
        if self.hang.is_set():
            self.release.wait(30)
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        time.sleep(self.step_s)
        for rid, state in list(self.running.items()):
            state[1] += 1
            done = state[1] >= state[0].max_tokens
            if done:
                del self.running[rid]
            out.append(RequestOutput(rid, [65 + state[1] % 26], done,
                                     FinishReason.LENGTH if done else None))
        return out

    def fail_all(self, message: str) -> list[RequestOutput]:
        while not self.inbox.empty():
            op, rid, params = self.inbox.get()
            if op == "add":
                self.running[rid] = [params, 0]
        out = [RequestOutput(r, finished=True, finish_reason=FinishReason.ERROR, error=message)
               for r in self.running]
        self.running.clear()
        return out

    def stats(self) -> dict[str, Any]:
        return {"model": "double", "max_model_len": 512, "max_prefill_tokens": 512,
                "vocab_size": 300, "running": len(self.running)}

    def tune(self, **knobs: Any) -> dict[str, Any]:
        return knobs


def start(tmp: Path, engine: Double | None = None, notifier: SystemdNotifier | None = None,
          **server: object) -> tuple[EmbeddedDaemon, Double]:
    engine = engine or Double()
    overrides = {"server.intake_endpoint": f"ipc://{tmp}/intake.sock",
                 "server.control_endpoint": f"ipc://{tmp}/control.sock"}
    overrides.update({f"server.{k}": v for k, v in server.items()})
    cfg = load_config(None, env={}, overrides=overrides)
    return EmbeddedDaemon(cfg, lambda _: engine, notifier=notifier).start(), engine


def test_a_failing_step_fails_its_requests_and_serving_goes_on(tmp_path: Path) -> None:
    d, engine = start(tmp_path)
    try:
        with Client(d.intake_endpoint, timeout_s=10) as c:
            stream = c.stream("a", max_tokens=1000)
            engine.fail_next = 1
            with pytest.raises(RequestError) as err:
                list(stream)
            assert err.value.code == "internal" and "illegal memory access" in err.value.message
            assert c.generate("b", max_tokens=3).final.usage.completion_tokens == 3
    finally:
        assert d.stop() == 0


def test_repeated_step_failures_end_the_daemon_with_status_1(tmp_path: Path) -> None:
    d, engine = start(tmp_path)
    engine.fail_next = 100
    with Client(d.intake_endpoint, timeout_s=10) as c:
        for _ in range(3):
            with pytest.raises(RequestError) as err:
                c.generate("x", max_tokens=5)
            assert err.value.code == "internal"
    assert d.stop(timeout_s=10) == 1


def test_drain_finishes_in_flight_work_and_refuses_new(tmp_path: Path) -> None:
    d, _ = start(tmp_path, grace_period_s=30.0)
    with Client(d.intake_endpoint, timeout_s=10) as c:
        streams = [c.stream(f"p{i}", max_tokens=100) for i in range(5)]
        with ControlClient(d.control_endpoint) as ctl:
            assert ctl.call("drain", exit=True)["state"] == "draining"
        with pytest.raises(RequestError) as err:
            c.generate("late")
        assert err.value.code == "shutting_down"
        for s in streams:
            assert sum(len(delta.token_ids) for delta in s) == 100
            assert s.final.finish_reason == "length"
    assert d.stop() == 0


def test_grace_period_expiry_fails_the_rest_explicitly(tmp_path: Path) -> None:
    d, _ = start(tmp_path, engine=Double(step_s=0.01), grace_period_s=0.3)
    with Client(d.intake_endpoint, timeout_s=10) as c:
        quick = c.stream("quick", max_tokens=3)
        slow = [c.stream(f"slow{i}", max_tokens=10_000) for i in range(3)]
        start_s = time.monotonic()
        threading.Thread(target=d.stop, daemon=True).start()
        assert list(quick) and quick.final.finish_reason == "length"
        for s in slow:
            with pytest.raises(RequestError) as err:
                list(s)
            assert err.value.code == "shutting_down" and "retry" in err.value.message
        assert time.monotonic() - start_s < 5.0


def received(sock: socket.socket, seconds: float) -> list[str]:
    """Every datagram that arrives within `seconds`."""
    messages, end = [], time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    return messages


def test_a_hung_engine_withholds_the_watchdog_and_status_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("neod.server.control.STATS_TIMEOUT_S", 0.5)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(5)
    notifier = SystemdNotifier(str(tmp_path / "notify"), watchdog_usec=400_000)
    engine = Double(load_s=0.1)
    d, _ = start(tmp_path, engine=engine, notifier=notifier)
    try:
        messages = []
        while not any("WATCHDOG=1" in m for m in messages):
            messages.append(notify.recv(4096).decode())
        assert any("READY=1" in m for m in messages)
        assert any("EXTEND_TIMEOUT_USEC=" in m for m in messages)  # sent while loading
        engine.hang.set()
        with Client(d.intake_endpoint, timeout_s=10) as c:
            c.stream("stuck", max_tokens=5)  # accepted; the step that serves it hangs
        received(notify, 0.6)  # pings sent before the silence exceeded WatchdogSec
        assert not any("WATCHDOG=1" in m for m in received(notify, 1.0))
        with ControlClient(d.control_endpoint, timeout_s=10) as ctl:
            assert "did not answer" in ctl.call("status")["engine"]["error"]
        engine.hang.clear()
        engine.release.set()
        assert any("WATCHDOG=1" in m for m in received(notify, 1.0))  # alive again
    finally:
        engine.hang.clear()
        engine.release.set()
        assert d.stop() == 0
    assert any("STOPPING=1" in m for m in received(notify, 0.5))
    notify.close()
