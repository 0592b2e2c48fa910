"""`neod`: run the serving daemon in the foreground (systemd runs it as Type=notify).

With no configuration at all it serves the built-in tiny model (on the GPU if there is one), so a
first run needs nothing but `neod`. Exit status: 0 after a drain, 1 on a start-up or engine failure
(systemd's Restart=on-failure then restarts it), 2 for a configuration error.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

import orjson
import typer

from neod import __version__
from neod.config import ConfigError, find_config_file, load_config

logger = logging.getLogger("neod")

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="neod: LLM serving daemon with CPU offloading of decoding attention (NEO).")

# Named flags are shorthands for `--set section.key=value`.
_FLAGS = {"model": "model.path", "preset": "model.preset", "device": "model.device",
          "intake": "server.intake_endpoint", "control": "server.control_endpoint",
          "policy": "scheduler.policy", "log_level": "server.log_level"}


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


@app.command()
def run(
    config: Path | None = typer.Option(None, "--config", "-c", help="TOML file (default: "
                                       "$NEOD_CONFIG, else /etc/neod/neod.toml if it exists)"),
    set_: list[str] = typer.Option([], "--set", help="override one key: section.key=value "
                                   "(repeatable)"),
    model: str | None = typer.Option(None, help="local Hugging Face model folder ([model] path)"),
    preset: str | None = typer.Option(None, help="model shape for random weights ([model] preset)"),
    device: str | None = typer.Option(None, help="auto, cpu, cuda or cuda:N ([model] device)"),
    intake: str | None = typer.Option(None, help="intake endpoint ([server] intake_endpoint)"),
    control: str | None = typer.Option(None, help="control endpoint ([server] control_endpoint)"),
    policy: str | None = typer.Option(None, help="auto, gpu-only or neo ([scheduler] policy)"),
    log_level: str | None = typer.Option(None, help="debug, info, warning or error"),
    check_config: bool = typer.Option(False, "--check-config", help="print the resolved "
                                      "configuration as JSON and exit"),
    version: bool = typer.Option(False, "--version", help="print the version and exit"),
) -> None:
    """Serve until SIGTERM or SIGINT, then drain."""
    if version:
        typer.echo(f"neod {__version__}")
        raise typer.Exit(0)
    named = {"model": model, "preset": preset, "device": device, "intake": intake,
             "control": control, "policy": policy, "log_level": log_level}
    overrides = list(set_) + [f"{_FLAGS[k]}={v}" for k, v in named.items() if v is not None]
    try:
        path = find_config_file(str(config) if config else None)
        cfg = load_config(path, os.environ, overrides)
    except ConfigError as exc:
        typer.echo(f"neod: configuration error: {exc}", err=True)
        raise typer.Exit(2) from None
    if check_config:
        typer.echo(orjson.dumps({"file": str(path) if path else None, **cfg.to_dict()},
                                option=orjson.OPT_INDENT_2).decode())
        raise typer.Exit(0)

    from neod.cli.logs import setup_logging
    from neod.server.daemon import serve
    from neod.server.sdnotify import SystemdNotifier
    from neod.server.transport import BindError

    setup_logging(cfg.server.log_level, cfg.server.log_format,
                  journal="JOURNAL_STREAM" in os.environ)
    logger.info("event=start version=%s pid=%d config=%s", __version__, os.getpid(), path)
    notifier = SystemdNotifier.from_env(os.environ)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            status = runner.run(serve(cfg, notifier, os.environ))
    except BindError as exc:
        logger.error("event=bind_failed error=%r", str(exc))
        status = 1
    except Exception:
        logger.exception("event=start_failed")
        notifier.notify(STATUS="failed to start (see the log)")
        status = 1
    finally:
        notifier.close()
    raise typer.Exit(status)


def main() -> None:
    app(prog_name="neod")
