"""What every neoctl command shares: connection settings, clients, and error output."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, NoReturn

import orjson
import typer

from neod.client import Client, ControlClient, DaemonUnavailable, RequestError
from neod.config import (
    Config,
    ConfigError,
    control_endpoint_candidates,
    expand_endpoint,
    find_config_file,
    load_config,
)

_NOT_RUNNING = ("is neod running? Start it with `systemctl start neod` (or run `neod`); "
                "`journalctl -u neod` shows why it stopped")


@dataclass
class Ctl:
    """Connection settings shared by every command."""

    config_path: str | None
    control: str | None
    intake: str | None
    timeout_s: float
    curve_server_key: str | None
    curve_client_key: str | None

    def config(self) -> Config:
        try:
            return load_config(find_config_file(self.config_path), os.environ)
        except ConfigError as exc:
            fail(f"configuration error: {exc}", 2)

    def control_endpoint(self) -> str:
        endpoint = self._existing_control_endpoint()
        if endpoint is None:
            candidates = control_endpoint_candidates(self.config(), os.environ)
            fail(f"no control socket at {' or '.join(c[len('ipc://'):] for c in candidates)}: "
                 f"{_NOT_RUNNING}")
        return endpoint

    def _existing_control_endpoint(self) -> str | None:
        """The endpoint to reach neod at: given, over TCP, or the first control socket that
        exists; None where there is none."""
        if self.control:
            return self.control
        for endpoint in control_endpoint_candidates(self.config(), os.environ):
            if not endpoint.startswith("ipc://"):
                return endpoint
            path = endpoint[len("ipc://"):]
            if os.path.exists(path):
                if not os.access(path, os.R_OK | os.W_OK):
                    fail(f"permission denied on the control socket {path}: run neoctl as the "
                         "daemon's user or root (e.g. `sudo -u neod neoctl ...`)")
                return endpoint
        return None

    def control_client(self) -> ControlClient:
        try:
            return self._connect(self.control_endpoint())
        except DaemonUnavailable as exc:
            fail(f"{exc}; {_NOT_RUNNING}")

    def _connect(self, endpoint: str) -> ControlClient:
        return ControlClient(endpoint, timeout_s=self.timeout_s,
                             connect_timeout_s=min(self.timeout_s, 3.0),
                             curve_server_key_file=self.curve_server_key,
                             curve_client_key_file=self.curve_client_key)

    def intake_client(self) -> Client:
        endpoint = self.intake or expand_endpoint(self.config().server.intake_endpoint, os.environ)
        try:
            return Client(endpoint, timeout_s=self.timeout_s,
                          connect_timeout_s=min(self.timeout_s, 3.0),
                          curve_server_key_file=self.curve_server_key,
                          curve_client_key_file=self.curve_client_key)
        except DaemonUnavailable as exc:
            fail(f"{exc}; {_NOT_RUNNING}")

    def call_if_running(self, command: str, **args: Any) -> dict[str, Any] | None:
        """As call, but None where no neod answers (no control socket, or nobody behind it)."""
        endpoint = self._existing_control_endpoint()
        if endpoint is None:
            return None
        try:
            with self._connect(endpoint) as client:
                return client.call(command, **args)
        except DaemonUnavailable:
            return None
        except RequestError as exc:
            fail(f"neod refused {command!r}: {exc.message} ({exc.code})")

    def call(self, command: str, **args: Any) -> dict[str, Any]:
        """One control command; a refusal or an absent daemon ends neoctl with a clear message."""
        with self.control_client() as client:
            try:
                return client.call(command, **args)
            except DaemonUnavailable as exc:
                fail(f"{exc}; {_NOT_RUNNING}")
            except RequestError as exc:
                fail(f"neod refused {command!r}: {exc.message} ({exc.code})")


def fail(message: str, status: int = 1) -> NoReturn:
    typer.echo(f"neoctl: {message}", err=True)
    raise typer.Exit(status)


def echo_json(obj: Any) -> None:
    typer.echo(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode())
