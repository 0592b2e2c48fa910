"""`python -m neod` as a process: SIGTERM drain, nothing lost, grace expiry, restart, sd_notify."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from neod.client import Client, DaemonUnavailable, RequestError

START_TIMEOUT_S = 120.0


def start_neod(tmp: Path, grace_s: float, env: dict[str, str] | None = None) -> subprocess.Popen:
    config = tmp / "neod.toml"
    config.write_text(f'[model]\ndevice = "cpu"\n[cache]\ncpu_kv_gib = 0.25\n'
                      f'[server]\ngrace_period_s = {grace_s}\n'
                      f'intake_endpoint = "ipc://{tmp}/intake.sock"\n'
                      f'control_endpoint = "ipc://{tmp}/control.sock"\n')
    log = (tmp / "neod.log").open("a")
    # One torch thread: on a 2-core host two OpenMP workers next to the event loop, the test
    # process and the engine thread oversubscribe the cores and slow each step 10-100x.
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "neod", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp / "neod.log").read_text()
        try:
            with Client(f"ipc://{tmp}/intake.sock", timeout_s=0.5, connect_timeout_s=0.5) as c:
                c.ping()
                return proc
        except DaemonUnavailable:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("neod did not start:\n" + (tmp / "neod.log").read_text())


def refused_after_signal(c: Client) -> RequestError:
    """New requests are refused with shutting_down once the signal has been handled."""
    deadline = time.monotonic() + 5
    while True:
        try:
            c.generate("late", max_tokens=1)
        except RequestError as exc:
            return exc
        assert time.monotonic() < deadline, "new requests were still accepted after SIGTERM"


class NotifyListener:
    """Plays systemd's side of NOTIFY_SOCKET: keeps every datagram neod sends."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def close(self) -> str:
        time.sleep(0.2)
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        return "\n".join(self.messages)


def test_sigterm_drains_nothing_lost_then_restarts(tmp_path: Path) -> None:
    notify = NotifyListener(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    proc = start_neod(tmp_path, grace_s=60, env=env)
    try:
        with Client(f"ipc://{tmp_path}/intake.sock", timeout_s=30) as c:
            streams = [c.stream(f"drain {i}", max_tokens=600, ignore_eos=True) for i in range(6)]
            firsts = [next(s) for s in streams]  # all accepted and decoding
            time.sleep(1.2)  # a watchdog ping or two
            proc.send_signal(signal.SIGTERM)
            assert refused_after_signal(c).code == "shutting_down"
            for s, first in zip(streams, firsts, strict=True):
                tokens = len(first.token_ids) + sum(len(d.token_ids) for d in s)
                assert s.final.finish_reason == "length" and tokens == 600
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    messages = notify.close()
    for expected in ("READY=1", "STATUS=", "WATCHDOG=1", "STOPPING=1"):
        assert expected in messages, messages
    assert messages.index("READY=1") > messages.index("STATUS=loading")

    proc = start_neod(tmp_path, grace_s=60)  # the same endpoints bind again
    try:
        with Client(f"ipc://{tmp_path}/intake.sock", timeout_s=30) as c:
            assert c.generate("again", max_tokens=3, ignore_eos=True).final.usage \
                .completion_tokens == 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "neod.log").read_text()
    assert log.count("event=ready") == 2 and log.count("event=stopped status=0") == 2
    assert "event=drain exit=True active=6" in log or "event=drain exit=True active=7" in log


@pytest.mark.parametrize("second_signal", [False, True])
def test_unfinished_work_fails_explicitly(tmp_path: Path, second_signal: bool) -> None:
    proc = start_neod(tmp_path, grace_s=60 if second_signal else 0.5)
    try:
        with Client(f"ipc://{tmp_path}/intake.sock", timeout_s=30) as c:
            streams = [c.stream(f"long {i}", max_tokens=4000, ignore_eos=True) for i in range(4)]
            for s in streams:
                next(s)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            if second_signal:
                refused_after_signal(c)
                proc.send_signal(signal.SIGTERM)
            for s in streams:
                with pytest.raises(RequestError) as err:
                    list(s)
                assert err.value.code == "shutting_down"
            assert time.monotonic() - start < 10
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
