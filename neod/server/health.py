"""What neod tells systemd while it serves: watchdog pings and a one-line status.

The watchdog ping is sent from the event loop, but only while the engine thread has made progress
within WatchdogSec: a hung GPU step (or a dead engine thread) stops the pings, and systemd
restarts the daemon. A stalled event loop stops them too, since the loop sends them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from neod.server.runner import EngineRunner
from neod.server.sdnotify import SystemdNotifier

logger = logging.getLogger(__name__)

STATUS_EVERY_S = 5.0


class HealthReporter:
    def __init__(self, loop: asyncio.AbstractEventLoop, notifier: SystemdNotifier,
                 runner: EngineRunner, status_line: Callable[[], str]) -> None:
        self._loop = loop
        self._notifier = notifier
        self._runner = runner
        self._status_line = status_line
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def start(self) -> None:
        if self._notifier.watchdog_s > 0:
            self._every("watchdog", self._notifier.watchdog_s / 2, self._watchdog)
        self._every("status", STATUS_EVERY_S,
                    lambda: self._notifier.notify(STATUS=self._status_line()))

    def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()

    def _every(self, name: str, period_s: float, fn: Callable[[], None]) -> None:
        def tick() -> None:
            fn()
            self._timers[name] = self._loop.call_later(period_s, tick)
        self._timers[name] = self._loop.call_later(period_s, tick)

    def _watchdog(self) -> None:
        silent_s = time.monotonic() - self._runner.last_beat
        if not self._runner.failed and silent_s < self._notifier.watchdog_s:
            self._notifier.notify(WATCHDOG=1)
        else:
            logger.error("event=watchdog_withheld engine_silent_s=%.1f", silent_s)
