"""One process's place in a tensor-parallel group: its rank, device, model shard, share of the CPU
pool's cores, and the start-up agreements with the other ranks.

Collectives (the model's all-reduces) run on torch.distributed's default group: NCCL on CUDA, gloo
on the CPU. Host-side messages (neod.dist.messages) run on a second group, always gloo. Start-up
agreements (block counts, whether to profile) go through the rendezvous TCPStore rather than a
collective, so a waiting rank polls and rank 0 watches the other processes meanwhile: a rank that
dies while it loads the model is reported at once, not after a timeout.

Timeouts are per process. Rank 0 leads, so its collectives time out (a hung rank becomes an
error); the other ranks only follow, and wait for rank 0's next step as long as the daemon idles
(when rank 0 dies, gloo sees the closed connections and each follower watches its parent).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from neod.dist.tp_model import tensor_parallel_llama

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"  # one host: every rank is a local process
LEADER_TIMEOUT = timedelta(seconds=120)  # rank 0's collectives and messages
FOLLOWER_TIMEOUT = timedelta(days=3650)  # followers wait out any idle period
START_TIMEOUT_S = 1800.0  # start-up agreements: a rank may load a large model slowly
POLL_S = 0.05


class RankGroup:
    def __init__(
        self,
        rank: int,
        world_size: int,
        store: dist.Store,
        device: torch.device,
        messages: dist.ProcessGroup,
        watch: Callable[[], None],
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.store = store
        self.device = device  # this rank's: cuda:(N + rank), or cpu
        self.messages = messages  # gloo group for neod.dist.messages
        self._watch = watch  # raises when another rank can no longer answer

    @classmethod
    def join(
        cls,
        rank: int,
        world_size: int,
        store: dist.Store,
        base_device: torch.device,
        watch: Callable[[], None] = lambda: None,
    ) -> RankGroup:
        """Rendezvous with the other ranks; `base_device` is the configured device (cuda:N or
        cpu), of which rank r takes cuda:(N + r)."""
        device = base_device
        if device.type == "cuda":
            device = torch.device("cuda", (device.index or 0) + rank)
            torch.cuda.set_device(device)
        timeout = LEADER_TIMEOUT if rank == 0 else FOLLOWER_TIMEOUT
        # Every rank is up before anyone blocks in the process group's own rendezvous.
        store.set(f"neod/joined/{rank}", "1")
        _await_keys(store, [f"neod/joined/{r}" for r in range(world_size)], watch)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
        messages = dist.new_group(backend="gloo", timeout=timeout)
        logger.info("tensor-parallel rank %d of %d joined device=%s", rank, world_size, device)
        return cls(rank, world_size, store, device, messages, watch)

    def close(self) -> None:
        """Leaves torch.distributed (also after a peer died: without it the process aborts at
        exit)."""
        if dist.is_initialized():
            dist.destroy_process_group()

    # ---- start-up ------------------------------------------------------------------------------
    def load_model(
        self, model_cfg: Any, device: torch.device, dtype: torch.dtype, max_positions: int | None
    ) -> tuple[Any, str]:
        """This rank's shard of the configured model, and the model's name.

        Every rank builds the whole model on its device (seeded random weights are then the same
        on every rank and as without tensor parallelism), keeps its shard and frees the rest."""
        from neod.engine.runtime import load_model

        full, name = load_model(model_cfg, device, dtype, max_positions)
        shard = tensor_parallel_llama(full.config, full.weights, max_positions)
        del full
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the KV pool is sized from the free memory
        return shard, name

    def cores(self, cores: list[int]) -> list[int]:
        """This rank's contiguous share of the CPU pool's cores (disjoint across ranks)."""
        if len(cores) < self.world_size:
            raise ValueError(
                f"the CPU pool has {len(cores)} core(s), fewer than the {self.world_size} "
                "tensor-parallel ranks that each need one; raise cpu.threads"
            )
        per_rank, extra = divmod(len(cores), self.world_size)
        start = self.rank * per_rank + min(self.rank, extra)
        return cores[start : start + per_rank + (self.rank < extra)]

    def agree_min(self, name: str, value: int) -> int:
        """The smallest of every rank's value (block counts: rank 0 allocates ids for all)."""
        return min(int(v) for v in self._gather(name, str(value)))

    def leader_decides(self, name: str, value: bool) -> bool:
        """Rank 0's value, on every rank."""
        key = f"neod/{name}/0"
        if self.rank == 0:
            self.store.set(key, "1" if value else "0")
        _await_keys(self.store, [key], self._watch)
        return self.store.get(key) == b"1"

    def _gather(self, name: str, value: str) -> list[str]:
        self.store.set(f"neod/{name}/{self.rank}", value)
        keys = [f"neod/{name}/{r}" for r in range(self.world_size)]
        _await_keys(self.store, keys, self._watch)
        return [self.store.get(k).decode() for k in keys]


def _await_keys(store: dist.Store, keys: list[str], watch: Callable[[], None]) -> None:
    """Poll until every key is set, calling `watch` in between (it raises when a rank is gone)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not store.check(keys):
        watch()
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"tensor-parallel ranks did not all reach {keys[0].rsplit('/', 1)[0]!r} within "
                f"{START_TIMEOUT_S:.0f} s"
            )
        time.sleep(POLL_S)
