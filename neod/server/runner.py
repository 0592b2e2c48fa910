"""The engine thread: builds the engine and is the only caller of `engine.step()`, so socket I/O
never waits on a step.

The event loop hands work over through a lock-protected inbox (submissions, aborts, calls such as
`stats`/`tune`) and gets outputs back through `deliver`, which it points at
`loop.call_soon_threadsafe`. Submissions wait in a priority heap and enter the engine only while
fewer than `window` handed-over requests still await their first token: that keeps priorities
meaningful without starving the engine's own batching. With nothing to do the thread sleeps on a
condition variable (no polling) and still refreshes `last_beat` every second, which is what the
systemd watchdog checks: a hung `step()` stops the beat. A call states how long it may take (its
caller's timeout), and the beat is set that far ahead while it runs.

The engine is built on this same thread: on CPU hosts, tensors created on one thread and computed
on another ran 5-20x slower (each OS thread that starts torch's OpenMP work gets its own team of
spinning workers), and one owner thread is the engine's threading contract anyway.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from neod.engine.request import FinishReason, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)

IDLE_BEAT_S = 1.0
MAX_CONSECUTIVE_STEP_FAILURES = 3


class EngineLike(Protocol):
    """The part of `neod.engine.Engine` the server uses (docs/architecture.md, "Engine API")."""

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams) -> None: ...

    def abort_request(self, request_id: str) -> None: ...

    def step(self) -> list[RequestOutput]: ...

    def has_unfinished(self) -> bool: ...

    def fail_all(self, message: str) -> list[RequestOutput]: ...

    def stats(self) -> dict[str, Any]: ...

    def tune(self, **knobs: Any) -> dict[str, Any]: ...


@dataclass(order=True)
class _Pending:
    sort_key: tuple[int, int]  # (-priority, arrival): higher priority first, then FIFO
    request_id: str = field(compare=False)
    prompt_token_ids: list[int] = field(compare=False)
    params: SamplingParams = field(compare=False)
    cancelled: bool = field(default=False, compare=False)


class EngineRunner:
    def __init__(self, build: Callable[[], EngineLike],
                 deliver: Callable[[list[RequestOutput], list[tuple[str, float]]], None],
                 on_fatal: Callable[[str], None], window: int) -> None:
        self._build = build
        self.engine: EngineLike | None = None
        # Set on the engine thread once the engine exists: its stats(), or the build's exception.
        self.ready: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        # Called on the engine thread with the outputs and the (request id, monotonic time) of
        # the requests handed to the engine since the last call.
        self._deliver = deliver
        self._on_fatal = on_fatal  # called on the engine thread, once, before the thread exits
        self._window = window
        self._cond = threading.Condition()
        self._heap: list[_Pending] = []
        self._pending: dict[str, _Pending] = {}
        self._aborts: list[str] = []
        # (fn, its future, seconds it may keep the engine thread busy without stopping the beat)
        self._calls: list[tuple[Callable[[EngineLike], Any], concurrent.futures.Future, float]] = []
        self._not_started: set[str] = set()
        self._admitted: list[tuple[str, float]] = []
        self._arrival = itertools.count()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="neod-engine", daemon=True)
        self.last_beat = time.monotonic()
        self.failed = False

    # ---- any thread ----------------------------------------------------------------------------
    @property
    def num_pending(self) -> int:
        """Requests neod holds that the engine has not been given yet."""
        return len(self._pending)

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               priority: int = 0) -> None:
        item = _Pending((-priority, next(self._arrival)), request_id, prompt_token_ids, params)
        with self._cond:
            self._pending[request_id] = item
            heapq.heappush(self._heap, item)
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify()

    def call(
        self, fn: Callable[[EngineLike], Any], allowance_s: float = 0.0
    ) -> concurrent.futures.Future:
        """Run `fn(engine)` on the engine thread between two steps. `allowance_s`: how long it may
        legitimately take (a CPU pool measured again) with the heartbeat kept; past that, a call
        that has not returned counts as a hang, like a step."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping or self.failed:
                future.set_exception(RuntimeError("the engine thread is not running"))
                return future
            self._calls.append((fn, future, allowance_s))
            self._cond.notify()
        return future

    def set_window(self, window: int) -> None:
        with self._cond:
            self._window = window
            self._cond.notify()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float) -> bool:
        """Ask the thread to exit after the current step; False if it did not within the timeout."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # ---- engine thread -------------------------------------------------------------------------
    def _admissible(self) -> bool:
        return bool(self._heap) and len(self._not_started) < self._window

    def _take_work(self) -> tuple[list, list[str], list[_Pending]] | None:
        assert self.engine is not None
        with self._cond:
            while not (self._stopping or self._calls or self._aborts or self._admissible()
                       or self.engine.has_unfinished()):
                self._cond.wait(IDLE_BEAT_S)
                self.last_beat = time.monotonic()
            if self._stopping:
                return None
            calls, self._calls = self._calls, []
            aborts, self._aborts = self._aborts, []
            admits = []
            now = time.monotonic()
            while self._admissible():
                item = heapq.heappop(self._heap)
                if item.cancelled:
                    continue
                del self._pending[item.request_id]
                self._not_started.add(item.request_id)
                self._admitted.append((item.request_id, now))
                admits.append(item)
            return calls, aborts, admits

    def _run(self) -> None:
        try:
            self.engine = self._build()
            self.ready.set_result(self.engine.stats())
        except BaseException as exc:
            self.failed = True
            self.ready.set_exception(exc)
        try:
            if self.engine is not None and not self.failed:
                self._loop()
        finally:
            close = getattr(self.engine, "close", None)  # scripted test engines may have none
            if close is not None:
                close()
            self.engine = None  # let its pools be freed once the thread is done
            with self._cond:
                calls, self._calls = self._calls, []
            for _, future, _ in calls:
                if future.set_running_or_notify_cancel():
                    future.set_exception(RuntimeError("the engine thread stopped"))

    def _loop(self) -> None:
        assert self.engine is not None
        failures = 0
        while (work := self._take_work()) is not None:
            calls, aborts, admits = work
            for fn, future, allowance_s in calls:
                if future.set_running_or_notify_cancel():
                    self.last_beat = time.monotonic() + allowance_s  # a beat ahead, for its length
                    try:
                        future.set_result(fn(self.engine))
                    except Exception as exc:  # the caller gets the error; the engine goes on
                        future.set_exception(exc)
                    self.last_beat = time.monotonic()
            for item in admits:
                self.engine.add_request(item.request_id, item.prompt_token_ids, item.params)
            # After the admissions: an abort that came with its own request's admission must
            # reach the engine after that request, or the engine ignores it and runs it to the end.
            outputs = self._abort(aborts)
            if self.engine.has_unfinished():
                try:
                    outputs += self.engine.step()
                    failures = 0
                except Exception as exc:
                    failures += 1
                    logger.exception("event=engine_step_failed consecutive=%d", failures)
                    if not self._recover(f"the engine step failed ({type(exc).__name__}: {exc})",
                                         failures, outputs):
                        return
            for out in outputs:
                if out.new_token_ids or out.finished:
                    self._not_started.discard(out.request_id)
            if outputs:
                self._flush(outputs)
            self.last_beat = time.monotonic()

    def _flush(self, outputs: list[RequestOutput]) -> None:
        admitted, self._admitted = self._admitted, []
        self._deliver(outputs, admitted)

    def _abort(self, request_ids: list[str]) -> list[RequestOutput]:
        """Abort in the engine; requests still in neod's heap end here with a synthetic output."""
        assert self.engine is not None
        outputs = []
        for rid in request_ids:
            with self._cond:
                item = self._pending.pop(rid, None)
            if item is not None:
                item.cancelled = True
                outputs.append(RequestOutput(rid, finished=True, finish_reason=FinishReason.ABORT))
            else:
                self.engine.abort_request(rid)
        return outputs

    def _recover(self, message: str, failures: int, outputs: list[RequestOutput]) -> bool:
        """Fail the engine's requests and go on; give up on repeated failures or failed cleanup."""
        assert self.engine is not None
        fatal = failures >= MAX_CONSECUTIVE_STEP_FAILURES
        try:
            outputs += self.engine.fail_all(message)
        except Exception:
            logger.exception("event=engine_fail_all_failed")
            fatal = True
        if not fatal:
            return True
        self.failed = True
        self._flush(outputs)
        self._on_fatal(f"{message}; {failures} consecutive failure(s), the engine is unusable")
        return False
