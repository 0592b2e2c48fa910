"""neod inside another process: the daemon on a background thread with its own event loop.

Benchmarks and tests use it to drive a real daemon through real sockets without a subprocess;
an application may use it to serve from a process it already runs. Signals stay with the host
process: stop it with `stop()` (a drain, like SIGTERM) or by leaving the `with` block.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Mapping
from typing import Any

from neod.config import Config
from neod.server.app import Server
from neod.server.daemon import EngineFactory, serve
from neod.server.sdnotify import SystemdNotifier


class EmbeddedDaemon:
    def __init__(self, cfg: Config, engine_factory: EngineFactory | None = None,
                 env: Mapping[str, str] | None = None, ready_timeout_s: float = 300.0,
                 notifier: SystemdNotifier | None = None) -> None:
        self.cfg = cfg
        self._notifier = notifier or SystemdNotifier(None)
        self._factory = engine_factory
        self._env = env
        self._ready_timeout_s = ready_timeout_s
        self._ready: concurrent.futures.Future[Server] = concurrent.futures.Future()
        self._status: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="neod-embedded", daemon=True)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            status = loop.run_until_complete(serve(
                self.cfg, self._notifier, self._env, self._factory, handle_signals=False,
                on_ready=self._ready.set_result))
            self._status.set_result(status)
        except BaseException as exc:
            self._status.set_exception(exc)
            if not self._ready.done():
                self._ready.set_exception(exc)
        finally:
            loop.close()

    def start(self) -> EmbeddedDaemon:
        """Start and wait until requests are served; start-up errors are raised here."""
        self._thread.start()
        concurrent.futures.wait([self._ready, self._status], self._ready_timeout_s,
                                return_when=concurrent.futures.FIRST_COMPLETED)
        if self._ready.done():
            self._ready.result()
            return self
        if self._status.done():
            self._status.result()
            raise RuntimeError("neod stopped before it was ready")
        raise TimeoutError(f"neod was not ready within {self._ready_timeout_s:g}s")

    @property
    def server(self) -> Server:
        return self._ready.result()

    @property
    def intake_endpoint(self) -> str:
        return self.server.intake_endpoint

    @property
    def control_endpoint(self) -> str:
        return self.server.control_endpoint

    def on_loop(self, fn: Callable[[Server], Any], timeout_s: float = 10.0) -> Any:
        """Run `fn(server)` on the daemon's loop thread (the only thread that may touch it)."""
        assert self._loop is not None

        async def call() -> Any:
            return fn(self.server)
        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout_s)

    def stop(self, timeout_s: float = 60.0) -> int:
        """Drain like SIGTERM and wait for the exit status."""
        if not self._status.done() and self._loop is not None and self._ready.done():
            self._loop.call_soon_threadsafe(self.server.request_shutdown)
        status = self._status.result(timeout_s)
        self._thread.join(timeout_s)
        return status

    def __enter__(self) -> EmbeddedDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
