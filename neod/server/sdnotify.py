"""sd_notify(3) without a dependency: datagrams to $NOTIFY_SOCKET (READY, STATUS, WATCHDOG, ...).

Outside systemd (no NOTIFY_SOCKET) every call is a no-op, so the daemon code never branches on it.
A name starting with '@' is an abstract socket. Send errors (a full queue included) are logged
once and otherwise ignored: notification is advisory and must never stall or stop the daemon.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

logger = logging.getLogger(__name__)


class SystemdNotifier:
    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        self._address = "\0" + address[1:] if address and address.startswith("@") else address
        self._sock: socket.socket | None = None
        self._warned = False
        self.watchdog_s = watchdog_usec / 1e6  # 0 = the unit has no WatchdogSec
        if self._address:
            # Non-blocking: a notification that does not fit is dropped, never waited for (the
            # event loop sends these, and a full receiver queue must not stall it).
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SystemdNotifier:
        """NOTIFY_SOCKET, and WATCHDOG_USEC when WATCHDOG_PID is unset or names this process."""
        usec = 0
        if env.get("WATCHDOG_USEC", "").isdigit() and env.get("WATCHDOG_PID", str(os.getpid())) \
                == str(os.getpid()):
            usec = int(env["WATCHDOG_USEC"])
        return cls(env.get("NOTIFY_SOCKET") or None, usec)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: str | int) -> None:
        """notify(READY=1, STATUS="serving") sends 'READY=1\\nSTATUS=serving'."""
        if self._sock is None:
            return
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            if not self._warned:
                logger.warning("event=sd_notify_failed socket=%s error=%s", self._address, exc)
                self._warned = True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
