"""Start-up order of the daemon: bind, load, ready, serve, drain.

The sockets are bound before the model loads, so a taken port or a bad key file fails in a second
rather than after minutes of loading; the control endpoint already answers `status` meanwhile,
while intake messages wait in ZeroMQ's queue. The engine is built on its own thread (the one that
will step it) while the loop keeps systemd's start timeout extended (EXTEND_TIMEOUT_USEC);
READY=1 is sent only once the engine exists, which means its model, KV pools and profile are
ready.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Mapping

from neod.config import Config
from neod.server.app import Server
from neod.server.runner import EngineLike
from neod.server.sdnotify import SystemdNotifier
from neod.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

EXTEND_EVERY_S = 10.0
EXTEND_BY_USEC = 30_000_000

EngineFactory = Callable[[Config], EngineLike]


def _default_factory(cfg: Config) -> EngineLike:
    from neod.engine import Engine

    return Engine(cfg)


async def serve(cfg: Config, notifier: SystemdNotifier, env: Mapping[str, str] | None = None,
                engine_factory: EngineFactory | None = None, handle_signals: bool = True,
                on_ready: Callable[[Server], None] | None = None) -> int:
    """Run the daemon until it has shut down; returns the process exit status.

    `handle_signals=False` (for a daemon embedded off the main thread) leaves SIGTERM/SIGINT alone;
    `on_ready` is called on the loop once requests are served.
    """
    loop = asyncio.get_running_loop()
    tokenizer = load_tokenizer(cfg.model)
    server = Server(cfg, tokenizer, notifier, env)
    server.bind()
    signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
    for sig in signals:
        loop.add_signal_handler(sig, server.request_shutdown)
    try:
        logger.info("event=loading preset=%s path=%r device=%s tokenizer=%s", cfg.model.preset,
                    cfg.model.path, cfg.model.device, tokenizer.name)
        notifier.notify(STATUS="loading the model")
        factory = engine_factory or _default_factory
        built = asyncio.wrap_future(server.start_engine(lambda: factory(cfg)))
        closed = asyncio.ensure_future(server.wait_closed())
        while not built.done():
            notifier.notify(EXTEND_TIMEOUT_USEC=EXTEND_BY_USEC)
            await asyncio.wait({built, closed}, timeout=EXTEND_EVERY_S,
                               return_when=asyncio.FIRST_COMPLETED)
            if closed.done():
                logger.info("event=stopped_while_loading")
                return closed.result()
        info = built.result()
        server.open_intake(info)
        notifier.notify(READY=1, STATUS=f"serving {info.get('model', cfg.model.preset)} on "
                                        f"{server.intake_endpoint}")
        logger.info("event=ready model=%s device=%s intake=%s control=%s max_model_len=%s",
                    info.get("model"), info.get("device"), server.intake_endpoint,
                    server.control_endpoint, info.get("max_model_len"))
        if on_ready is not None:
            on_ready(server)
        return await closed
    except BaseException:
        await _abandon(server)
        raise
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def _abandon(server: Server) -> None:
    """Release the sockets when start-up fails, so a retry can bind them again."""
    await server.close_now(1)
