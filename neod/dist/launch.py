"""Rank 0's side of tensor parallelism: start the other ranks, lead their steps, supervise them.

The process that runs the engine is rank 0. `start_tensor_parallel` checks the configuration,
opens the rendezvous store, spawns ranks 1..W-1 (neod.dist.follower) and builds rank 0's own
runtime as a member of the group; the runtime it returns carries a `Leader`, through which the
engine's swaps and forward passes reach every rank (EngineRuntime.swap / forward).

Supervision: a follower that has exited is named, with its exit code, by the next start-up wait
or step, and a collective that fails because a follower died is reported the same way; rank 0
never waits on a follower without a timeout. After a failed forward the ranks are out of step,
so every later step fails at once (the daemon then fails its requests and exits). `close()`
stops the followers and joins them, killing those that do not end in time.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch.distributed as dist

from neod.dist.group import HOST, LEADER_TIMEOUT, RankGroup
from neod.dist.messages import Step, Stop, Swap, send
from neod.dist.sharding import check_shardable

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 10.0  # a stopped follower releases its runtime within this
EXIT_GRACE_S = 3.0  # after a failed collective, how long a dying follower may take to be reaped


class RankExited(RuntimeError):
    """A tensor-parallel rank's process ended; the group cannot go on."""


def _model_config(cfg: Any) -> Any:
    from neod.model.config import ModelConfig
    from neod.model.presets import get_preset

    return ModelConfig.from_pretrained(cfg.model.path) if cfg.model.path else get_preset(
        cfg.model.preset
    )


def check_config(cfg: Any) -> None:
    """Errors that need no process: the model must split over tp_size, the GPUs must exist."""
    from neod.engine.runtime import resolve_device

    world_size = cfg.parallel.tp_size
    check_shardable(_model_config(cfg), world_size)
    device = resolve_device(cfg.model.device)
    if device.type == "cuda":
        import torch

        first, visible = device.index or 0, torch.cuda.device_count()
        if first + world_size > visible:
            raise ValueError(
                f"parallel.tp_size = {world_size} needs cuda:{first}..cuda:{first + world_size - 1}"
                f" but {visible} GPU(s) are visible"
            )


def start_tensor_parallel(cfg: Any, refresh_profile: bool = False) -> Any:
    """Rank 0's EngineRuntime, the other ranks started and built alongside it."""
    from neod.dist.follower import follower_main
    from neod.engine.runtime import build_runtime, resolve_device

    check_config(cfg)
    world_size = cfg.parallel.tp_size
    store = dist.TCPStore(HOST, 0, world_size, is_master=True, timeout=LEADER_TIMEOUT,
                          wait_for_workers=False)
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(
            target=follower_main,
            args=(cfg, rank, world_size, store.port, os.getpid(), refresh_profile,
                  logging.getLogger().getEffectiveLevel()),
            name=f"neod-tp{rank}",
            daemon=True,
        )
        for rank in range(1, world_size)
    ]
    leader = Leader(procs)
    try:
        for p in procs:
            p.start()
        logger.info("tensor parallelism tp_size=%d follower_pids=%s", world_size,
                    [p.pid for p in procs])
        leader.group = RankGroup.join(0, world_size, store, resolve_device(cfg.model.device),
                                      watch=leader.check)
        runtime = build_runtime(cfg, refresh_profile, group=leader.group)
    except BaseException as exc:
        cause = leader.cause(exc)
        leader.close()
        if cause is not exc:
            raise cause from exc
        raise
    leader.serving = True
    return replace(runtime, tp=leader)


class Leader:
    def __init__(self, procs: list[multiprocessing.process.BaseProcess]) -> None:
        self.procs = procs  # rank r is procs[r - 1]
        self.group: RankGroup | None = None
        self.serving = False  # every rank built its runtime and waits for steps
        self._swaps: list[Swap] = []  # issued since the last forward
        self._out_of_step: str | None = None
        self._closed = False

    @property
    def world_size(self) -> int:
        return len(self.procs) + 1

    def exited(self, wait_s: float = 0.0) -> RankExited | None:
        """The error naming the first follower that has exited, waiting up to `wait_s` for one
        (a peer's closed connection can be seen before its process is reaped)."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, p in enumerate(self.procs, start=1):
                if p.exitcode is not None:
                    return RankExited(
                        f"tensor-parallel rank {rank} (pid {p.pid}) exited with code "
                        f"{_describe_exit(p.exitcode)}"
                    )
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def cause(self, exc: BaseException) -> BaseException:
        """What to report for `exc`: a failed collective (RuntimeError) after which a follower
        exits is reported as that follower's exit; anything else rank 0 raised itself, and the
        followers, which run the same code, most likely raised the same."""
        if isinstance(exc, RuntimeError) and not isinstance(exc, RankExited):
            exited = self.exited(wait_s=EXIT_GRACE_S)
            if exited is not None:
                return exited
        return exc

    def check(self) -> None:
        """Raise RankExited if a follower has ended."""
        exited = self.exited()
        if exited is not None:
            raise exited

    def swapped(self, out_pairs: list[tuple[int, int]], in_pairs: list[tuple[int, int]]) -> None:
        for to_host, pairs in ((True, out_pairs), (False, in_pairs)):
            if pairs:
                self._swaps.append(Swap(to_host, [list(p) for p in pairs]))

    def run(
        self, executor: Any, batches: list[Any], while_waiting: Callable[[], None] | None = None
    ) -> list[Any]:
        """Send the step to every rank, then run rank 0's forward; returns its logits."""
        self.check()
        if self._out_of_step is not None:
            raise RuntimeError(self._out_of_step)
        try:
            send(Step(self._swaps, [b.rows for b in batches]), self.group.messages)
            self._swaps = []
            return executor.run(batches, while_waiting)
        except Exception as exc:
            self._out_of_step = (
                f"tensor-parallel ranks are out of step since a step failed ({exc}); restart neod"
            )
            cause = self.cause(exc)
            if cause is not exc:
                raise cause from exc
            raise

    def close(self) -> None:
        """Stop the followers and wait for them (kill those that do not end in time)."""
        if self._closed:
            return
        self._closed = True
        # Only followers waiting for a step can take a Stop; others (still starting, or stuck in a
        # collective after a failed step) are killed.
        healthy = self.serving and self._out_of_step is None and self.exited() is None
        if healthy:
            try:
                send(Stop(), self.group.messages)
            except Exception as exc:  # a rank died meanwhile: it is joined below like the rest
                logger.warning("could not send stop to the tensor-parallel ranks: %s", exc)
        for rank, p in enumerate(self.procs, start=1):
            if p.pid is None:
                continue  # never started
            p.join(JOIN_TIMEOUT_S if healthy else 0)
            if p.exitcode is None:
                logger.warning("killing tensor-parallel rank %d (pid %d)", rank, p.pid)
                p.kill()
                p.join()
        if dist.is_initialized():  # also when rank 0 failed half-way through joining
            dist.destroy_process_group()


def _describe_exit(code: int) -> str:
    if code >= 0:
        return str(code)
    try:
        return f"{code} ({signal.Signals(-code).name})"
    except ValueError:
        return str(code)
