"""ZeroMQ ROUTER sockets on the asyncio loop: hardened binding, reading and non-blocking sending.

Binding applies every limit the daemon relies on: ROUTER_MANDATORY (a reply to a vanished peer
raises instead of vanishing, so its requests get cancelled), ZMQ_MAXMSGSIZE (an oversized message
drops the sender's connection before it is read), finite high-water marks, heartbeats and optional
CURVE on TCP, and an 0700 directory plus an 0600 socket file for ipc.

`RouterLink` reads with `add_reader` on the socket's FD. That FD is edge-triggered: it signals only
when the socket's state changes, so every wake-up drains the socket until EAGAIN, and every send
schedules one more drain (a send can consume the edge of a message that arrived meanwhile). A peer
whose high-water mark is full gets its messages queued in a bounded, ordered backlog retried on a
timer; a peer that does not drain it is treated as gone.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from neod.config import ServerConfig

logger = logging.getLogger(__name__)

READ_BATCH = 512
RETRY_S = 0.005
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


class BindError(RuntimeError):
    """An endpoint could not be bound; the message says why and what to change."""


def _tcp_host(endpoint: str) -> str:
    return endpoint[len("tcp://"):].rsplit(":", 1)[0]


def _prepare_ipc(endpoint: str) -> Path:
    """Create the socket's folder 0700; remove a stale socket file, refuse a live one."""
    path = Path(endpoint[len("ipc://"):])
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = path.parent.stat().st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        logger.warning("event=ipc_dir_writable dir=%s mode=%o: other users could replace the "
                       "socket", path.parent, stat.S_IMODE(mode))
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: left over from a daemon that died
        else:
            raise BindError(f"another process is serving at {endpoint}; stop it or choose another "
                            "endpoint ([server] intake_endpoint / control_endpoint)")
        finally:
            probe.close()
    return path


def load_curve_server_keys(secret_key_file: str) -> tuple[bytes, bytes]:
    """(public, secret) from a zmq certificate file holding the secret key."""
    try:
        public, secret = zmq.auth.load_certificate(secret_key_file)
    except (OSError, ValueError) as exc:
        raise BindError(f"cannot read the CURVE secret key file {secret_key_file}: {exc}") from None
    if secret is None:
        raise BindError(f"{secret_key_file} holds no secret key; give the *.key_secret file "
                        "([server] curve_secret_key_file)")
    return public, secret


def start_authenticator(ctx: zmq.Context, server: ServerConfig) -> ThreadAuthenticator | None:
    """ZAP handler for CURVE: only keys in `curve_authorized_keys_dir`, or any if it is empty."""
    if not server.curve_secret_key_file:
        return None
    if server.curve_authorized_keys_dir and not Path(server.curve_authorized_keys_dir).is_dir():
        raise BindError(f"[server] curve_authorized_keys_dir {server.curve_authorized_keys_dir} "
                        "is not a folder")
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("neod.server.auth"))
    auth.start()
    auth.configure_curve(domain="*", location=server.curve_authorized_keys_dir
                         or zmq.auth.CURVE_ALLOW_ANY)
    return auth


def bind_router(ctx: zmq.Context, endpoint: str, server: ServerConfig, role: str) -> zmq.Socket:
    """A ROUTER socket bound to `endpoint` with the daemon's limits; `role` names it in errors."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, server.max_message_bytes)
    sock.setsockopt(zmq.SNDHWM, server.high_water_mark)
    sock.setsockopt(zmq.RCVHWM, server.high_water_mark)
    sock.setsockopt(zmq.LINGER, 0)
    ipc_path = None
    try:
        if endpoint.startswith("tcp://"):
            if server.heartbeat_interval_s > 0:
                sock.setsockopt(zmq.HEARTBEAT_IVL, int(server.heartbeat_interval_s * 1000))
                sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(server.heartbeat_timeout_s * 1000))
                sock.setsockopt(zmq.HEARTBEAT_TTL, int(server.heartbeat_timeout_s * 1000))
            if server.curve_secret_key_file:
                public, secret = load_curve_server_keys(server.curve_secret_key_file)
                sock.curve_server = True
                sock.curve_publickey, sock.curve_secretkey = public, secret
            elif _tcp_host(endpoint) not in _LOOPBACK_HOSTS:
                logger.warning("event=plain_tcp_exposed role=%s endpoint=%s: anyone who can "
                               "reach it can submit work; set [server] curve_secret_key_file",
                               role, endpoint)
        else:
            ipc_path = _prepare_ipc(endpoint)
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close(0)
        hint = "another process holds it" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise BindError(f"cannot bind the {role} endpoint {endpoint}: {hint}") from None
    except BaseException:
        sock.close(0)
        raise
    if ipc_path is not None:
        os.chmod(ipc_path, 0o600)
    return sock


class RouterLink:
    """One ROUTER socket driven by the loop: `on_message(peer, frames)` per inbound message."""

    def __init__(self, sock: zmq.Socket, loop: asyncio.AbstractEventLoop,
                 on_message: Callable[[bytes, list[bytes]], None],
                 on_peer_lost: Callable[[bytes], None], max_backlog: int) -> None:
        self._sock = sock
        self._loop = loop
        self._on_message = on_message
        self._on_peer_lost = on_peer_lost
        self._max_backlog = max_backlog
        self._backlog: dict[bytes, collections.deque[bytes]] = {}
        self._drain_scheduled = False
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False

    def start(self) -> None:
        self._loop.add_reader(self._sock.getsockopt(zmq.FD), self._drain)
        self._schedule_drain()

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled and not self._closed:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        if self._closed:
            return
        for _ in range(READ_BATCH):
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._on_message(frames[0], frames[1:])
            if self._closed:
                return
        self._schedule_drain()  # more may be waiting: yield to other callbacks first

    def send(self, peer: bytes, payload: bytes) -> None:
        if self._closed:
            return
        queued = self._backlog.get(peer)
        if queued is not None:
            self._queue(peer, queued, payload)
            return
        if self._send_now(peer, payload) is False:
            self._queue(peer, self._backlog.setdefault(peer, collections.deque()), payload)
        self._schedule_drain()

    def _send_now(self, peer: bytes, payload: bytes) -> bool | None:
        """True sent, False would block, None the peer is gone (reported)."""
        try:
            self._sock.send_multipart((peer, payload), zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise
            self._lose(peer)
            return None

    def _queue(self, peer: bytes, queued: collections.deque[bytes], payload: bytes) -> None:
        if len(queued) >= self._max_backlog:
            logger.warning("event=peer_not_reading peer=%s backlog=%d: dropping it", peer.hex(),
                           len(queued))
            self._lose(peer)
            return
        queued.append(payload)
        if self._retry is None:
            self._retry = self._loop.call_later(RETRY_S, self._flush_backlog)

    def _lose(self, peer: bytes) -> None:
        self._backlog.pop(peer, None)
        self._on_peer_lost(peer)

    def _flush_backlog(self) -> None:
        self._retry = None
        for peer in list(self._backlog):
            queued = self._backlog.get(peer)
            while queued:
                sent = self._send_now(peer, queued[0])
                if not sent:
                    break
                queued.popleft()
            if queued is not None and not queued and peer in self._backlog:
                del self._backlog[peer]
        if self._backlog and not self._closed:
            self._retry = self._loop.call_later(RETRY_S, self._flush_backlog)
        self._schedule_drain()

    @property
    def backlog_size(self) -> int:
        return sum(len(q) for q in self._backlog.values())

    def close(self, linger_ms: int = 0) -> None:
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        self._loop.remove_reader(self._sock.getsockopt(zmq.FD))
        self._sock.close(linger_ms)
