"""The control endpoint: status, tune, drain, resume and ping for neoctl, on a socket of its own.

Commands that need the engine (`status`, `tune`) run on the engine thread between two steps and
are awaited with a timeout, so a stuck engine shows up as a clear error in `neoctl status` instead
of a hang. Handlers are found in a command-to-method table.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from neod import __version__
from neod.protocol import (
    CPU_RETUNE_TIMEOUT_S,
    ControlRequest,
    ErrorCode,
    ProtocolError,
    decode_control,
    encode_reply,
)

if TYPE_CHECKING:
    from neod.server.app import Server
    from neod.server.transport import RouterLink

logger = logging.getLogger(__name__)

STATS_TIMEOUT_S = 5.0
TUNE_TIMEOUT_S = 30.0


class ControlHandler:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.link: RouterLink | None = None
        self._tasks: set[asyncio.Task] = set()
        self._commands: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "status": self._status, "tune": self._tune, "drain": self._drain,
            "resume": self._resume, "ping": self._ping}

    def on_message(self, peer: bytes, frames: list[bytes]) -> None:
        task = asyncio.ensure_future(self._handle(peer, frames))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, peer: bytes, frames: list[bytes]) -> None:
        assert self.link is not None
        req = ""
        try:
            if len(frames) != 1:
                raise ProtocolError(ErrorCode.BAD_REQUEST, "expected one frame")
            request: ControlRequest = decode_control(frames[0])
            req = request.req
            result = await self._commands[request.command](request.args)
            reply = encode_reply(req, result)
        except ProtocolError as exc:
            reply = encode_reply(req or exc.request_id or "", error=exc)
        except Exception as exc:
            logger.exception("event=control_failed")
            error = ProtocolError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            reply = encode_reply(req, error=error)
        self.link.send(peer, reply)

    async def _on_engine(self, fn: Callable[[Any], Any], timeout_s: float, what: str) -> Any:
        runner = self.server.runner
        if runner is None or not self.server.model_info:
            raise ProtocolError(ErrorCode.OVERLOADED, f"cannot {what} yet: the daemon is "
                                                      f"{self.server.state.value}; retry shortly")
        try:
            call = runner.call(fn, allowance_s=timeout_s)  # as long as this waits for it
            return await asyncio.wait_for(asyncio.wrap_future(call), timeout_s)
        except TimeoutError:
            raise ProtocolError(ErrorCode.INTERNAL, f"the engine did not answer {what} within "
                                                    f"{timeout_s:.0f}s; it may be stuck in a step "
                                                    "(see the daemon's log)") from None
        except RuntimeError as exc:
            raise ProtocolError(ErrorCode.INTERNAL, str(exc)) from None

    async def _status(self, args: dict[str, Any]) -> dict[str, Any]:
        server = self.server
        result: dict[str, Any] = {"pid": os.getpid(), "server": server.server_stats()}
        if not server.model_info:  # still loading
            result["engine"] = {"state": server.state.value}
            return result
        try:
            result["engine"] = await self._on_engine(lambda e: e.stats(), STATS_TIMEOUT_S, "status")
        except ProtocolError as exc:
            result["engine"] = {"error": exc.message}
        return result

    async def _tune(self, args: dict[str, Any]) -> dict[str, Any]:
        start = time.monotonic()

        def apply(engine: Any) -> dict[str, Any]:
            try:
                return engine.tune(**args)
            except ValueError as exc:  # the engine's validation: a bad value changes nothing
                raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc)) from None

        timeout_s = CPU_RETUNE_TIMEOUT_S if "cpu_threads" in args else TUNE_TIMEOUT_S
        applied = await self._on_engine(apply, timeout_s, "tune")
        server = self.server
        if "max_prefill_tokens" in applied:
            server.model_info["max_prefill_tokens"] = applied["max_prefill_tokens"]
        if "max_batch_size" in applied and not server.cfg.server.engine_window and server.runner:
            server.runner.set_window(applied["max_batch_size"])
        logger.info("event=tuned %s took_ms=%.1f", " ".join(f"{k}={v}" for k, v in applied.items()),
                    (time.monotonic() - start) * 1000)
        return {"applied": applied}

    async def _drain(self, args: dict[str, Any]) -> dict[str, Any]:
        server = self.server
        if server.state.value not in ("serving", "draining"):
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, f"the daemon is {server.state.value}")
        # The drain starts after this reply is sent: with nothing in flight, exiting is immediate.
        task = asyncio.ensure_future(server.drain(exit_after=args["exit"]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return {"state": "draining", "exit": args["exit"],
                "active_requests": server.server_stats()["active_requests"],
                "grace_period_s": server.cfg.server.grace_period_s}

    async def _resume(self, args: dict[str, Any]) -> dict[str, Any]:
        if not self.server.resume():
            exiting = " and exiting" if self.server.exiting else ""
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"cannot resume: the daemon is "
                                                       f"{self.server.state.value}{exiting}")
        return {"state": self.server.state.value}

    async def _ping(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"state": self.server.state.value, "version": __version__, "pid": os.getpid()}
