"""`neoctl`: operate a running neod (status, tuning, drain, generate, keys).

Command groups live in their own modules and register themselves on `app`; a new group (profile,
predict, ...) adds a module with a `register(app)` function and one line below. The connection
details shared by every command (config file, endpoints, CURVE keys, timeout) are options of the
app itself: `neoctl --control ipc:///run/neod/control.sock status`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from neod.cli.common import Ctl, echo_json, fail

# Command modules should import these from neod.cli.common; ctl re-exports them for older ones.
__all__ = ["Ctl", "app", "echo_json", "fail", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Operate a running neod daemon.")


@app.callback()
def options(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, "--config", "-c", help="neod's TOML file (default: "
                                       "$NEOD_CONFIG, else /etc/neod/neod.toml if it exists)"),
    control: str | None = typer.Option(None, help="control endpoint (default: from the config)"),
    intake: str | None = typer.Option(None, help="intake endpoint for `generate` (default: from "
                                      "the config)"),
    timeout: float = typer.Option(10.0, help="seconds to wait for an answer"),
    curve_server_key: str | None = typer.Option(None, help="the daemon's public key file (CURVE)"),
    curve_client_key: str | None = typer.Option(None, help="this client's secret key file (CURVE)"),
) -> None:
    ctx.obj = Ctl(str(config) if config else None, control, intake, timeout, curve_server_key,
                  curve_client_key)


def _register() -> None:
    from neod.cli import gen, keys, ops, profiling

    for module in (ops, gen, keys, profiling):
        module.register(app)


_register()


def main() -> None:
    app(prog_name="neoctl")
