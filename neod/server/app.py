"""The server: intake and control sockets on the event loop, the engine on its own thread.

Everything that touches a socket or a job runs on the loop thread; the engine thread only reaches
the loop through `call_soon_threadsafe`. Intake messages are dispatched from a type-to-handler
table. Every accepted request ends in exactly one `final` or `error` event, whatever happens:
producer cancel, deadline, stop string, engine error, vanished producer (nothing to send then),
drain and shutdown. Shutdown drains: intake refuses new work, in-flight requests get the grace
period, the rest fail with `shutting_down`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import zmq

from neod import __version__
from neod.config import Config, expand_endpoint
from neod.engine.request import RequestOutput, SamplingParams
from neod.protocol import (
    Accepted,
    Cancel,
    Error,
    ErrorCode,
    Generate,
    Ping,
    Pong,
    ProtocolError,
    decode_intake,
    encode,
)
from neod.server.admission import (
    REQUIRED_MODEL_INFO,
    limits_error,
    prompt_error,
    prompt_limit,
    sampling_params,
)
from neod.server.control import ControlHandler
from neod.server.health import HealthReporter
from neod.server.jobs import CAUSE_CANCEL, CAUSE_CLIENT_GONE, CAUSE_STOP_STRING, Job
from neod.server.metrics import Metrics
from neod.server.runner import EngineLike, EngineRunner
from neod.server.sdnotify import SystemdNotifier
from neod.server.textstream import OutputText
from neod.server.transport import RouterLink, bind_router, start_authenticator
from neod.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

TOKENIZE_INLINE_CHARS = 16384  # longer prompts are tokenized on a worker thread
FLUSH_TIMEOUT_S = 2.0
ENGINE_STOP_TIMEOUT_S = 10.0


class State(enum.StrEnum):
    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


class Server:
    def __init__(self, cfg: Config, tokenizer: Tokenizer, notifier: SystemdNotifier | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.notifier = notifier or SystemdNotifier(None)
        self.intake_endpoint = expand_endpoint(cfg.server.intake_endpoint, env)
        self.control_endpoint = expand_endpoint(cfg.server.control_endpoint, env)
        self.state = State.LOADING
        self.metrics = Metrics()
        self.runner: EngineRunner | None = None
        self.model_info: dict[str, Any] = {}
        self.exiting = False
        self._engine_failed = False  # the exit status is 1 then, whoever started the shutdown
        self._ctx = zmq.Context()
        self._auth = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._intake: RouterLink | None = None
        self._control: RouterLink | None = None
        self._peers: dict[bytes, dict[str, Job]] = {}
        self._by_engine_id: dict[str, Job] = {}
        self._reserved: set[tuple[bytes, str]] = set()  # being tokenized off the loop
        self._num_waiting = 0  # accepted, no first token yet
        self._engine_ids = itertools.count()
        self._tasks: set[asyncio.Task] = set()
        self._health: HealthReporter | None = None
        self._grace_over = asyncio.Event()
        self._done: asyncio.Future[int] | None = None
        self._handlers: dict[type, Callable[[bytes, Any, float], None]] = {
            Generate: self._on_generate, Cancel: self._on_cancel, Ping: self._on_ping}

    # ---- lifecycle -----------------------------------------------------------------------------
    def bind(self) -> None:
        """Bind both endpoints (before the model loads, so a taken port fails fast)."""
        self._loop = asyncio.get_running_loop()
        self._done = self._loop.create_future()
        hwm = self.cfg.server.high_water_mark
        intake = control_sock = None
        try:
            self._auth = start_authenticator(self._ctx, self.cfg.server)
            intake = bind_router(self._ctx, self.intake_endpoint, self.cfg.server, "intake")
            control_sock = bind_router(self._ctx, self.control_endpoint, self.cfg.server, "control")
        except BaseException:
            if intake is not None:
                intake.close(0)
            if self._auth is not None:
                self._auth.stop()
            self._ctx.term()
            raise
        self._intake = RouterLink(intake, self._loop, self._on_intake, self._on_peer_lost, hwm)
        handler = ControlHandler(self)
        self._control = RouterLink(control_sock, self._loop, handler.on_message, lambda _: None,
                                   hwm)
        handler.link = self._control
        self._control.start()

    def start_engine(self, build: Callable[[], EngineLike]) -> concurrent.futures.Future:
        """Build the engine on the thread that will step it; the future gives its stats()."""
        assert self._loop is not None
        window = self.cfg.server.engine_window or self.cfg.scheduler.max_batch_size
        loop = self._loop
        self.runner = EngineRunner(
            build,
            lambda outs, admitted: loop.call_soon_threadsafe(self._on_outputs, outs, admitted),
            lambda msg: loop.call_soon_threadsafe(self._on_engine_fatal, msg), window)
        self.runner.start()
        return self.runner.ready

    def open_intake(self, model_info: dict[str, Any]) -> None:
        """Start serving once the engine is built: intake reader, watchdog and status timers."""
        assert self._intake is not None
        missing = [k for k in REQUIRED_MODEL_INFO if not isinstance(model_info.get(k), int)]
        if missing:
            raise RuntimeError(f"the engine's stats() lacks {', '.join(missing)}: the server "
                               "cannot validate prompts without them")
        self.model_info = dict(model_info)
        self.state = State.SERVING
        self._intake.start()
        assert self._loop is not None and self.runner is not None
        self._health = HealthReporter(self._loop, self.notifier, self.runner, self._status_line)
        self._health.start()

    async def wait_closed(self) -> int:
        """Exit status once the server has shut down: 0 after a drain, 1 if the engine failed."""
        assert self._done is not None
        return await self._done

    def request_shutdown(self) -> None:
        """SIGTERM/SIGINT: the first one drains, the second cuts the grace period short."""
        if self.state in (State.LOADING, State.STOPPED):
            self._spawn(self.close_now(0))
        elif self.exiting:
            logger.warning("event=grace_cut reason=second_signal active=%d",
                           len(self._by_engine_id))
            self._grace_over.set()
        else:
            self._spawn(self.drain(exit_after=True))

    async def drain(self, exit_after: bool) -> None:
        """Refuse new requests and let in-flight ones finish; with `exit_after`, only within the
        grace period, then shut down."""
        if self.state not in (State.SERVING, State.DRAINING) or self.exiting:
            return
        self.state = State.DRAINING
        logger.info("event=drain exit=%s active=%d grace_s=%s", exit_after, self._open_jobs(),
                    self.cfg.server.grace_period_s)
        if not exit_after:
            return
        self.exiting = True
        self.notifier.notify(STOPPING=1, STATUS="draining")
        deadline = time.monotonic() + self.cfg.server.grace_period_s
        while self._open_jobs() and not self._grace_over.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._grace_over.wait(), min(left, 0.05))
        for job in list(self._by_engine_id.values()):
            if not job.closed:
                self._end_now(job, ErrorCode.SHUTTING_DOWN.value)
        await self.close_now(0)

    def resume(self) -> bool:
        if self.state != State.DRAINING or self.exiting:
            return False
        self.state = State.SERVING
        logger.info("event=resume")
        return True

    def _open_jobs(self) -> int:
        return sum(1 for j in self._by_engine_id.values() if not j.closed) + len(self._reserved)

    async def close_now(self, status: int) -> None:
        if self.state == State.STOPPED:
            return
        self.state = State.STOPPED
        if self._health is not None:
            self._health.stop()
        end = time.monotonic() + FLUSH_TIMEOUT_S
        while self._intake is not None and self._intake.backlog_size and time.monotonic() < end:
            await asyncio.sleep(0.01)
        # While the model still loads there is nothing to wait for: the thread dies with us.
        if self.runner is not None and self.model_info and \
                not await asyncio.to_thread(self.runner.stop, ENGINE_STOP_TIMEOUT_S):
            logger.error("event=engine_thread_stuck: it did not stop within %ss",
                         ENGINE_STOP_TIMEOUT_S)
        for link in (self._intake, self._control):
            if link is not None:
                link.close(linger_ms=1000)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()
        status = 1 if self._engine_failed else status
        logger.info("event=stopped status=%d", status)
        assert self._done is not None
        if not self._done.done():
            self._done.set_result(status)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- intake --------------------------------------------------------------------------------
    def _send(self, peer: bytes, event: Any) -> None:
        assert self._intake is not None
        self._intake.send(peer, encode(event))

    def _reject(self, peer: bytes, request_id: str | None, code: ErrorCode, message: str) -> None:
        self.metrics.count(f"error_{code.value}")
        self._send(peer, Error(request_id, code.value, message))

    def _on_intake(self, peer: bytes, frames: list[bytes]) -> None:
        now = time.monotonic()
        if len(frames) != 1:
            self._reject(peer, None, ErrorCode.BAD_REQUEST,
                         f"expected one frame holding a JSON object, got {len(frames)} frames "
                         "(use a DEALER socket and send a single frame)")
            return
        try:
            msg = decode_intake(frames[0])
        except ProtocolError as exc:
            self._reject(peer, exc.request_id, exc.code, exc.message)
            return
        try:
            self._handlers[type(msg)](peer, msg, now)
        except Exception:  # a bug must cost one request, never the intake
            logger.exception("event=intake_failed type=%s", msg.type)
            self._reject(peer, getattr(msg, "id", None), ErrorCode.INTERNAL,
                         "neod failed to handle this message (its log has the details)")

    def _on_ping(self, peer: bytes, msg: Ping, now: float) -> None:
        self._send(peer, Pong(msg.nonce, __version__, self.state.value))

    def _on_cancel(self, peer: bytes, msg: Cancel, now: float) -> None:
        job = self._peers.get(peer, {}).get(msg.id)
        if job is not None:  # cancelling an unknown or finished request is a no-op
            self._abort(job, CAUSE_CANCEL)

    def _on_generate(self, peer: bytes, msg: Generate, now: float) -> None:
        error = self._admission_error(peer, msg)
        if error is not None:
            self._reject(peer, msg.id, *error)
            return
        if msg.prompt is None:
            self._admit(peer, msg, now, list(msg.prompt_token_ids or ()))
        elif len(msg.prompt) <= TOKENIZE_INLINE_CHARS:
            self._admit(peer, msg, now, self.tokenizer.encode(msg.prompt))
        else:
            self._reserved.add((peer, msg.id))
            self._spawn(self._tokenize_then_admit(peer, msg, now))

    async def _tokenize_then_admit(self, peer: bytes, msg: Generate, now: float) -> None:
        assert self._loop is not None and msg.prompt is not None
        try:
            ids = await self._loop.run_in_executor(None, self.tokenizer.encode, msg.prompt)
        except Exception:
            logger.exception("event=tokenize_failed")
            self._reject(peer, msg.id, ErrorCode.INTERNAL, "neod failed to tokenize the prompt "
                                                           "(its log has the details)")
            return
        finally:
            self._reserved.discard((peer, msg.id))
        if self.state != State.SERVING:
            self._reject(peer, msg.id, ErrorCode.SHUTTING_DOWN, "neod is shutting down; retry "
                         "this request on another instance")
            return
        self._admit(peer, msg, now, ids)

    def _admission_error(self, peer: bytes, msg: Generate) -> tuple[ErrorCode, str] | None:
        srv = self.cfg.server
        if self.state != State.SERVING:
            return ErrorCode.SHUTTING_DOWN, ("neod is draining and accepts no new requests; retry "
                                             "on another instance or after it restarts")
        jobs = self._peers.get(peer, {})
        if msg.id in jobs or (peer, msg.id) in self._reserved:
            return ErrorCode.BAD_REQUEST, f"request id {msg.id!r} is already in use by an " \
                                          "unfinished request of this connection"
        if len(jobs) >= srv.max_inflight_per_client:
            return ErrorCode.OVERLOADED, (f"this connection has {len(jobs)} unfinished requests, "
                                          f"the limit is {srv.max_inflight_per_client}; wait for "
                                          "some to finish")
        if self._num_waiting + len(self._reserved) >= srv.max_queued_requests:
            return ErrorCode.OVERLOADED, (f"{self._num_waiting} requests are already waiting to "
                                          f"start (limit {srv.max_queued_requests}); retry later "
                                          "or on another instance")
        return limits_error(msg, srv)

    def _admit(self, peer: bytes, msg: Generate, now: float, ids: list[int]) -> None:
        assert self.runner is not None and self._loop is not None
        refusal = prompt_error(ids, self.model_info, self.cfg.server)
        params = sampling_params(msg) if refusal is None else refusal
        if not isinstance(params, SamplingParams):
            self._reject(peer, msg.id, *params)
            return
        engine_id = str(next(self._engine_ids))
        job = Job(peer, msg.id, engine_id, msg.stream, msg.stop_token_ids, now, len(ids),
                  OutputText(self.tokenizer.detokenizer(ids), msg.stop))
        self._peers.setdefault(peer, {})[msg.id] = job
        self._by_engine_id[engine_id] = job
        self._num_waiting += 1
        self.metrics.count("accepted")
        self._send(peer, Accepted(msg.id, len(ids)))
        deadline_s = msg.deadline_s or self.cfg.server.default_deadline_s
        if deadline_s:
            job.deadline = self._loop.call_later(deadline_s, self._abort, job,
                                                 ErrorCode.DEADLINE_EXCEEDED.value)
        self.runner.submit(engine_id, ids, params, msg.priority)

    # ---- request endings -----------------------------------------------------------------------
    def _abort(self, job: Job, cause: str) -> None:
        """Stop a job early; its end event follows when the engine confirms (blocks freed then)."""
        if job.abort_cause is not None or job.closed:
            return
        job.abort_cause = cause
        assert self.runner is not None
        self.runner.abort(job.engine_id)
        if cause == CAUSE_CLIENT_GONE:
            self._close_job(job, None)  # nobody to tell; the engine's report only frees the blocks

    def _end_now(self, job: Job, code: str) -> None:
        """Report the end at once, without waiting for the engine (end of the grace period)."""
        self._abort(job, code)  # keeps an earlier cause: a cancelled job still ends "cancelled"
        if not job.closed:
            self._close_job(job, None)

    def _on_peer_lost(self, peer: bytes) -> None:
        jobs = self._peers.get(peer, {})
        if jobs:
            logger.info("event=producer_gone peer=%s requests=%d", peer.hex(), len(jobs))
            self.metrics.count("producer_gone")
        for job in list(jobs.values()):
            self._abort(job, CAUSE_CLIENT_GONE)

    def _on_outputs(self, outputs: list[RequestOutput], admitted: list[tuple[str, float]]) -> None:
        now = time.monotonic()
        for engine_id, at in admitted:
            job = self._by_engine_id.get(engine_id)
            if job is not None:
                job.admitted = at
        for out in outputs:
            job = self._by_engine_id.get(out.request_id)
            if job is None:
                continue
            try:
                self._take_output(job, out, now)
            except Exception:  # e.g. a detokenizer bug: that request fails, the others go on
                logger.exception("event=output_failed request=%s", job.engine_id)
                self._end_now(job, ErrorCode.INTERNAL.value)
                if out.finished:
                    self._by_engine_id.pop(job.engine_id, None)

    def _take_output(self, job: Job, out: RequestOutput, now: float) -> None:
        if out.new_token_ids and job.abort_cause is None and not job.closed:
            if job.first_token is None:
                self._num_waiting -= 1
            self.metrics.tokens(len(out.new_token_ids), now)
            delta = job.take_tokens(out.new_token_ids, now)
            if delta is not None and (delta.text or delta.token_ids):
                self._send(job.peer, delta)
            if job.text.stopped_by is not None:
                self._abort(job, CAUSE_STOP_STRING)
        if out.finished:
            self._finished(job, out)

    def _finished(self, job: Job, out: RequestOutput) -> None:
        del self._by_engine_id[job.engine_id]
        if not job.closed:
            self._close_job(job, out)

    def _close_job(self, job: Job, out: RequestOutput | None) -> None:
        """Send the job's end events and drop it from the producer's table."""
        now = time.monotonic()
        job.closed = True
        if job.first_token is None:
            self._num_waiting -= 1
        if job.deadline is not None:
            job.deadline.cancel()
        jobs = self._peers.get(job.peer)
        if jobs is not None and jobs.get(job.client_id) is job:
            del jobs[job.client_id]
            if not jobs:
                del self._peers[job.peer]
        events = job.ending(out, now)
        for event in events:
            self._send(job.peer, event)
        if events:
            last = events[-1]
            self.metrics.count(f"final_{last.finish_reason}" if last.type == "final"
                               else f"error_{last.code}")
            t = job.timings(now)
            self.metrics.finished(t.queue_ms, t.ttft_ms if job.first_token is not None else None,
                                  t.tpot_ms if job.num_tokens > 1 else None)

    def _on_engine_fatal(self, message: str) -> None:
        self._engine_failed = True
        logger.critical("event=engine_failed message=%r: failing all requests and exiting", message)
        for job in list(self._by_engine_id.values()):
            if not job.closed:
                job.abort_cause = ErrorCode.INTERNAL.value
                self._close_job(job, None)
        self._by_engine_id.clear()
        self.exiting = True
        self._spawn(self.close_now(1))

    # ---- status --------------------------------------------------------------------------------
    def _status_line(self) -> str:
        return (f"{self.state.value}: {len(self._by_engine_id)} active, {self._num_waiting} "
                f"waiting, {self.metrics.tokens_per_s(time.monotonic())} tok/s")

    def server_stats(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "state": self.state.value,
            "version": __version__,
            "intake_endpoint": self.intake_endpoint,
            "active_requests": len(self._by_engine_id),
            "waiting_requests": self._num_waiting,
            "held_by_neod": self.runner.num_pending if self.runner else 0,
            "producers": len(self._peers),
            "send_backlog": self._intake.backlog_size if self._intake else 0,
            "prompt_limit": prompt_limit(self.model_info, self.cfg.server)
            if self.model_info else None,
            **self.metrics.snapshot(now),
        }
