"""The engine thread: priorities and the admission window, aborts, calls, failures, idling.

A scripted engine double stands in where the real one cannot produce the situation (a step that
raises, a precise admission order); the end-to-end tests use the real engine.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neod.engine.request import FinishReason, RequestOutput, SamplingParams
from neod.server.runner import MAX_CONSECUTIVE_STEP_FAILURES, EngineRunner


class ScriptedEngine:
    """Each request yields `tokens` tokens, one per step; `fail_steps` steps raise."""

    def __init__(self, tokens: int = 2, fail_steps: int = 0) -> None:
        self.tokens = tokens
        self.fail_steps = fail_steps
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.running: dict[str, int] = {}
        self.added: list[str] = []
        self.steps = 0
        self.fail_all_calls = 0

    def add_request(self, rid: str, ids: list[int], params: SamplingParams) -> None:
        self.inbox.put(("add", rid))

    def abort_request(self, rid: str) -> None:
        self.inbox.put(("abort", rid))

    def has_unfinished(self) -> bool:
        return bool(self.running) or not self.inbox.empty()

    def step(self) -> list[RequestOutput]:
        out = []
        while not self.inbox.empty():
            op, rid = self.inbox.get()
            if op == "add":
                self.added.append(rid)
                self.running[rid] = 0
            elif self.running.pop(rid, None) is not None:
                out.append(RequestOutput(rid, finished=True, finish_reason=FinishReason.ABORT))
        self.steps += 1
        if self.fail_steps:
            self.fail_steps -= 1
            raise RuntimeError("device lost")
        for rid in list(self.running):
            self.running[rid] += 1
            done = self.running[rid] >= self.tokens
            if done:
                del self.running[rid]
            out.append(RequestOutput(rid, [self.running.get(rid, 0)], done,
                                     FinishReason.LENGTH if done else None))
        return out

    def fail_all(self, message: str) -> list[RequestOutput]:
        self.fail_all_calls += 1
        while not self.inbox.empty():
            op, rid = self.inbox.get()
            if op == "add":
                self.running[rid] = 0
        out = [RequestOutput(r, finished=True, finish_reason=FinishReason.ERROR, error=message)
               for r in self.running]
        self.running.clear()
        return out

    def stats(self) -> dict[str, Any]:
        return {"running": len(self.running)}

    def tune(self, **knobs: Any) -> dict[str, Any]:
        if knobs.get("policy") == "bad":
            raise ValueError("bad policy")
        return knobs


class Collector:
    def __init__(self) -> None:
        self.outputs: list[RequestOutput] = []
        self.admitted: list[str] = []
        self.fatal: list[str] = []
        self.cond = threading.Condition()

    def deliver(self, outputs: list[RequestOutput], admitted: list[tuple[str, float]]) -> None:
        with self.cond:
            self.outputs += outputs
            self.admitted += [rid for rid, _ in admitted]
            self.cond.notify_all()

    def on_fatal(self, message: str) -> None:
        with self.cond:
            self.fatal.append(message)
            self.cond.notify_all()

    def wait_finished(self, n: int, timeout_s: float = 5.0) -> list[RequestOutput]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.finished()) >= n, timeout_s), self.outputs
            return self.finished()

    def finished(self) -> list[RequestOutput]:
        return [o for o in self.outputs if o.finished]


PARAMS = SamplingParams(max_tokens=2)


def make(engine: ScriptedEngine, window: int = 8) -> tuple[EngineRunner, Collector]:
    sink = Collector()
    return EngineRunner(lambda: engine, sink.deliver, sink.on_fatal, window), sink


def test_every_request_finishes_once_and_window_orders_by_priority() -> None:
    engine = ScriptedEngine(tokens=2)
    runner, sink = make(engine, window=1)
    for i, prio in enumerate([0, 0, 5, -1, 5]):
        runner.submit(f"r{i}", [1], PARAMS, priority=prio)
    runner.start()
    try:
        finished = sink.wait_finished(5)
    finally:
        assert runner.stop(5.0)
    assert sorted(o.request_id for o in finished) == [f"r{i}" for i in range(5)]
    # all were queued before the thread started: priority 5 first (FIFO among equals), then 0, -1
    assert engine.added == ["r2", "r4", "r0", "r1", "r3"]
    assert sink.admitted == engine.added
    assert runner.num_pending == 0


def test_abort_of_a_request_still_held_by_neod_never_reaches_the_engine() -> None:
    engine = ScriptedEngine(tokens=50)
    runner, sink = make(engine, window=1)
    runner.submit("busy", [1], PARAMS)
    runner.submit("held", [1], PARAMS)
    runner.abort("held")
    runner.start()
    try:
        held = next(o for o in sink.wait_finished(1) if o.request_id == "held")
        runner.abort("busy")
        sink.wait_finished(2)
    finally:
        assert runner.stop(5.0)
    assert held.finish_reason == FinishReason.ABORT
    assert "held" not in engine.added


def test_abort_that_arrives_with_its_requests_admission_stops_it() -> None:
    engine = ScriptedEngine(tokens=10_000)
    runner, sink = make(engine, window=8)
    runner.submit("x", [1], PARAMS)
    runner.abort("x")  # both wait for the same take: admitted and aborted in one batch
    runner.start()
    try:
        (out,) = sink.wait_finished(1)
    finally:
        assert runner.stop(5.0)
    assert out.request_id == "x" and out.finish_reason == FinishReason.ABORT
    assert engine.running == {}


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.integers(-2, 2)),  # priority
        st.tuples(st.just("abort"), st.integers(0, 30)),  # the n-th request submitted so far
        st.tuples(st.just("pause"), st.just(0)),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(ops=OPS, window=st.integers(1, 4))
def test_every_request_ends_exactly_once_whatever_the_interleaving(ops, window) -> None:
    """Submissions and aborts race the engine thread; requests never finish by themselves, so
    each must end through its abort, once, and leave nothing running."""
    engine = ScriptedEngine(tokens=10**9)
    runner, sink = make(engine, window=window)
    runner.start()
    submitted: list[str] = []
    try:
        for op, arg in ops:
            if op == "submit":
                submitted.append(f"r{len(submitted)}")
                runner.submit(submitted[-1], [1], PARAMS, priority=arg)
            elif op == "abort" and submitted:
                runner.abort(submitted[arg % len(submitted)])
            else:
                time.sleep(0.001)
        for rid in submitted:
            runner.abort(rid)
        ends = sink.wait_finished(len(submitted))
    finally:
        assert runner.stop(5.0)
    assert sorted(o.request_id for o in ends) == sorted(submitted)
    assert all(o.finish_reason == FinishReason.ABORT for o in ends)
    assert engine.running == {} and runner.num_pending == 0


def test_calls_run_between_steps_and_carry_exceptions() -> None:
    engine = ScriptedEngine()
    runner, _ = make(engine)
    runner.start()
    try:
        assert runner.call(lambda e: e.tune(policy="neo")).result(5) == {"policy": "neo"}
        with pytest.raises(ValueError, match="bad policy"):
            runner.call(lambda e: e.tune(policy="bad")).result(5)
    finally:
        assert runner.stop(5.0)
    with pytest.raises(RuntimeError, match="not running"):
        runner.call(lambda e: e.stats()).result(1)


def test_a_long_call_keeps_the_beat_for_its_allowance_only() -> None:
    engine = ScriptedEngine()
    runner, _ = make(engine)
    runner.start()
    try:
        slow = runner.call(lambda e: time.sleep(0.6), allowance_s=30.0)
        time.sleep(0.3)
        assert runner.last_beat > time.monotonic() + 20  # a resize measuring the pool: alive
        slow.result(5)
        time.sleep(0.05)
        assert abs(time.monotonic() - runner.last_beat) < 1.0
        stuck = runner.call(lambda e: time.sleep(1.0))  # no allowance: silent while it runs
        time.sleep(0.6)
        assert time.monotonic() - runner.last_beat >= 0.3
        stuck.result(5)
    finally:
        assert runner.stop(5.0)


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on() -> None:
    engine = ScriptedEngine(tokens=2, fail_steps=1)
    runner, sink = make(engine)
    runner.submit("a", [1], PARAMS)
    runner.start()
    try:
        (failed,) = sink.wait_finished(1)
        assert failed.finish_reason == FinishReason.ERROR and "device lost" in failed.error
        runner.submit("b", [1], PARAMS)
        ok = sink.wait_finished(2)[-1]
    finally:
        assert runner.stop(5.0)
    assert ok.request_id == "b" and ok.finish_reason == FinishReason.LENGTH
    assert not sink.fatal and not runner.failed


def test_repeated_step_failures_are_fatal_and_reported() -> None:
    engine = ScriptedEngine(tokens=100, fail_steps=100)
    runner, sink = make(engine)
    runner.start()
    for i in range(MAX_CONSECUTIVE_STEP_FAILURES):
        runner.submit(f"r{i}", [1], PARAMS)
        sink.wait_finished(i + 1)
    with sink.cond:
        assert sink.cond.wait_for(lambda: sink.fatal, 5.0)
    assert runner.failed and "unusable" in sink.fatal[0]
    assert engine.fail_all_calls == MAX_CONSECUTIVE_STEP_FAILURES
    assert runner.stop(5.0)


def test_the_engine_is_built_on_the_thread_that_steps_it() -> None:
    threads = []

    class Recording(ScriptedEngine):
        def __init__(self) -> None:
            threads.append(threading.get_ident())
            super().__init__()

        def step(self) -> list[RequestOutput]:
            threads.append(threading.get_ident())
            return super().step()

    sink = Collector()
    runner = EngineRunner(Recording, sink.deliver, sink.on_fatal, 8)
    runner.submit("a", [1], PARAMS)
    runner.start()
    try:
        assert runner.ready.result(5) == {"running": 0}
        sink.wait_finished(1)
    finally:
        assert runner.stop(5.0)
    assert len(set(threads)) == 1 and threads[0] != threading.get_ident()


def test_a_failed_build_is_reported_through_ready() -> None:
    def broken() -> ScriptedEngine:
        raise RuntimeError("no CUDA device")

    sink = Collector()
    runner = EngineRunner(broken, sink.deliver, sink.on_fatal, 8)
    runner.start()
    with pytest.raises(RuntimeError, match="no CUDA device"):
        runner.ready.result(5)
    assert runner.stop(5.0) and runner.failed


def test_idle_thread_sleeps_but_keeps_its_heartbeat() -> None:
    engine = ScriptedEngine()
    runner, _ = make(engine)
    runner.start()
    try:
        time.sleep(1.3)
        assert engine.steps == 0  # no busy stepping without work
        assert time.monotonic() - runner.last_beat < 1.2
    finally:
        assert runner.stop(5.0)
