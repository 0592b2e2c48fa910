"""Socket hardening: limits and options set at bind, ipc permissions, stale and live sockets."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest
import zmq
from support import free_port

from neod.config import ServerConfig
from neod.server.transport import BindError, bind_router, load_curve_server_keys


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.term()


def test_tcp_router_limits_and_heartbeats(ctx: zmq.Context) -> None:
    cfg = ServerConfig(max_message_bytes=65536, high_water_mark=123, heartbeat_interval_s=2.0,
                       heartbeat_timeout_s=7.0)
    sock = bind_router(ctx, f"tcp://127.0.0.1:{free_port()}", cfg, "intake")
    try:
        assert sock.getsockopt(zmq.MAXMSGSIZE) == 65536
        assert sock.getsockopt(zmq.SNDHWM) == 123 and sock.getsockopt(zmq.RCVHWM) == 123
        assert sock.getsockopt(zmq.HEARTBEAT_IVL) == 2000
        assert sock.getsockopt(zmq.HEARTBEAT_TIMEOUT) == 7000
        assert sock.getsockopt(zmq.LINGER) == 0
    finally:
        sock.close(0)


def test_taken_port_is_a_clear_error(ctx: zmq.Context) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    first = bind_router(ctx, endpoint, ServerConfig(), "intake")
    try:
        with pytest.raises(BindError, match=f"cannot bind the control endpoint {endpoint}: "
                                            "another process holds it"):
            bind_router(ctx, endpoint, ServerConfig(), "control")
    finally:
        first.close(0)


def test_ipc_permissions_and_stale_sockets(ctx: zmq.Context, tmp_path: Path) -> None:
    folder = tmp_path / "run" / "neod"
    endpoint = f"ipc://{folder}/control.sock"
    sock = bind_router(ctx, endpoint, ServerConfig(), "control")
    try:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE((folder / "control.sock").stat().st_mode) == 0o600
        with pytest.raises(BindError, match="another process is serving at"):
            bind_router(ctx, endpoint, ServerConfig(), "control")
    finally:
        sock.close(0)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(folder / "stale.sock"))  # a file nobody listens on, as a crash leaves behind
    stale.close()
    sock = bind_router(ctx, f"ipc://{folder}/stale.sock", ServerConfig(), "intake")
    sock.close(0)


def test_curve_key_files(tmp_path: Path) -> None:
    import zmq.auth

    public_file, secret_file = zmq.auth.create_certificates(str(tmp_path), "server")
    public, secret = load_curve_server_keys(secret_file)
    assert len(public) == 40 and len(secret) == 40
    with pytest.raises(BindError, match="holds no secret key"):
        load_curve_server_keys(public_file)
    with pytest.raises(BindError, match="cannot read the CURVE secret key file"):
        load_curve_server_keys(str(tmp_path / "missing"))
