"""A tensor-parallel rank other than 0: builds its runtime, then repeats rank 0's steps.

Started by rank 0 (neod.dist.launch) in a fresh interpreter. It builds the same runtime as rank 0
(its shard of the model, its KV pools of Hkv / W heads, its cores of the CPU pool), then loops:
receive a `Step`, issue its swaps, build its sub-batches from the rows and run the executor's
forward pass, whose all-reduces meet rank 0's; the logits are dropped, since rank 0 samples. It
never decides anything, so it cannot drift from rank 0.

It leaves the terminal's process group, so Ctrl-C reaches rank 0 alone (which drains, then stops
it), and it exits by itself when its parent is gone: a follower never outlives rank 0.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from neod.dist.group import FOLLOWER_TIMEOUT, HOST, RankGroup
from neod.dist.messages import Message, Step, Stop, receive
from neod.engine.batch import sub_batch_from_rows

EXIT_ORPHANED = 3  # the parent (rank 0) is gone
PARENT_POLL_S = 1.0


def follower_main(cfg: Any, rank: int, world_size: int, port: int, parent_pid: int,
                  refresh_profile: bool, log_level: int) -> None:
    """The process target of rank `rank`; `port` is rank 0's TCPStore, `log_level` rank 0's."""
    from neod.engine.runtime import build_runtime, resolve_device

    logging.basicConfig(
        level=log_level, format=f"%(asctime)s neod-tp{rank} %(levelname)s %(name)s %(message)s"
    )
    os.setpgrp()
    _exit_with_parent(parent_pid)
    store = dist.TCPStore(HOST, port, world_size, is_master=False, timeout=FOLLOWER_TIMEOUT)
    group = RankGroup.join(rank, world_size, store, resolve_device(cfg.model.device))
    try:
        runtime = build_runtime(cfg, refresh_profile, group=group)
        try:
            _follow(runtime, group)
        finally:
            runtime.close()
    finally:
        group.close()


def _exit_with_parent(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="neod-tp-parent", daemon=True).start()


def _follow(runtime: Any, group: RankGroup) -> None:
    handlers: dict[type, Callable[[Any, Any], bool]] = {Step: _run_step, Stop: lambda rt, m: False}
    while True:
        msg: Message = receive(group.messages)
        if not handlers[type(msg)](runtime, msg):
            return


def _run_step(runtime: Any, step: Step) -> bool:
    executor, gpu_pool, cpu_pool = runtime.executor, runtime.gpu_pool, runtime.cpu_pool
    for swap in step.swaps:
        src, dst = (gpu_pool, cpu_pool) if swap.to_host else (cpu_pool, gpu_pool)
        executor.swap(src, dst, [tuple(p) for p in swap.pairs], to_host=swap.to_host)
    batches = [sub_batch_from_rows(rows, [], runtime.device) for rows in step.batches]
    executor.run(batches)  # logits discarded: rank 0 samples
    return True
