"""Start-up: everything derived once from the config and this host, kept apart from the config
itself.

The device, the dtype, the model, both KV pools (sized from measured memory), the CPU attention pool
(sized from the measured memory bandwidth), the cost model (from this host's profile) and the
executor. None of it is written back into the config.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from neod.cache.pool import KVLayout, allocate_pool, gpu_pool_blocks, host_pool_blocks
from neod.engine.executor import Executor
from neod.engine.graphs import DecodeGraphs
from neod.engine.stage_graphs import StageGraphs
from neod.model.llama import LlamaModel
from neod.model.presets import get_preset
from neod.sched import (
    CalibratedCostModel,
    CostModel,
    Profile,
    Scheduler,
    SplitRule,
    TableCostModel,
    ZeroCostModel,
)

logger = logging.getLogger(__name__)

# Activation memory per batch token is estimated from the layer widths, then multiplied by this
# factor to leave room for the caching allocator's fragmentation and attention workspaces.
ACTIVATION_SAFETY_FACTOR = 3
CPU_DEVICE_HOST_POOL_GIB = 1.0  # default host KV pool when the model itself runs on the CPU


@dataclass
class EngineRuntime:
    cfg: Any  # what it was built from; a resized CPU pool is profiled again under it
    device: torch.device
    model: Any  # LlamaModel
    model_name: str
    layout: KVLayout
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    max_rows: int  # largest batch the staging buffers can hold
    max_tokens: int  # largest token budget the staging buffers can hold
    gpu_pool: torch.Tensor
    cpu_pool: torch.Tensor | None
    cpu_attention: Any  # CpuAttention | None
    cpu_threads: int
    cpu_bandwidth_gbps: float | None
    cpu_tile_path: str | None  # the products on AMX tiles ("scores+values", "scores") or None
    profile: Profile | None  # what the scheduler's costs come from; None on ranks other than 0
    executor: Executor
    scheduler: Scheduler
    tp: Any = None  # neod.dist.launch.Leader on rank 0 of a tensor-parallel group, else None
    cpu_node: int | None = None  # the GPU's NUMA node, whose cores the CPU pool prefers
    process_cpus: frozenset[int] = frozenset()  # what this process may run on, before isolation
    other_cpus: frozenset[int] | None = None  # where its other threads run, if kept off the pool

    @property
    def num_gpu_blocks(self) -> int:
        return self.gpu_pool.shape[1]

    @property
    def num_cpu_blocks(self) -> int:
        return 0 if self.cpu_pool is None else self.cpu_pool.shape[1]

    @property
    def tp_size(self) -> int:
        return 1 if self.tp is None else self.tp.world_size

    def swap(self, out_pairs: list[tuple[int, int]], in_pairs: list[tuple[int, int]]) -> None:
        """Issue this iteration's block copies: swap-outs, then swap-ins (on every rank)."""
        self.executor.swap(self.gpu_pool, self.cpu_pool, out_pairs, to_host=True)
        self.executor.swap(self.cpu_pool, self.gpu_pool, in_pairs, to_host=False)
        if self.tp is not None:
            self.tp.swapped(out_pairs, in_pairs)

    def forward(
        self, batches: list[Any], while_waiting: Callable[[], None] | None = None
    ) -> list[torch.Tensor]:
        """The executor's forward pass; with tensor parallelism, on every rank at once.
        while_waiting runs on this thread once the pass is issued, while the devices compute."""
        if self.tp is None:
            return self.executor.run(batches, while_waiting)
        return self.tp.run(self.executor, batches, while_waiting)

    def close(self) -> None:
        """Stops the other tensor-parallel ranks, the CPU attention pool and the executor's helper
        thread."""
        if self.tp is not None:
            self.tp.close()
        self.executor.close()
        if self.cpu_attention is not None:
            self.release_pool_cores()
            self.cpu_attention.close()

    def isolate_pool(self) -> None:
        self.other_cpus = isolate_pool(
            self.cfg.cpu, self.cpu_attention, self.process_cpus, self.tp_size
        )

    def release_pool_cores(self) -> None:
        """Let this process's other threads run on any of its CPUs again."""
        from neod.cpu.threads import release_pool_cores

        if self.other_cpus is not None and not self.cpu_attention.closed:
            release_pool_cores(self.cpu_attention.thread_ids(), set(self.process_cpus))
            self.other_cpus = None

    def set_cpu_threads(self, threads: int) -> None:
        """Resize the CPU attention pool, pinned as at start, and bring the cost model along: the
        stored profile for the new size, or this one with its CPU side measured again now (a
        profile of the old size would mislead every offload decision)."""
        if self.cpu_attention is None:
            raise ValueError(
                "this engine has no CPU attention pool (policy gpu-only without a host KV pool)"
            )
        if self.tp is not None:
            raise ValueError(
                "cpu_threads is fixed at start under tensor parallelism (the cores are split "
                "between the ranks); change cpu.threads and restart"
            )
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"cpu_threads must be an integer >= 1, got {threads!r}")
        if threads == self.cpu_threads:
            return
        from neod.cpu import pool_cores
        from neod.engine.profiler import load_or_profile
        from neod.kernels.cpu_attention import use_tile_path

        reserve = self.cfg.cpu.reserve_cores
        self.release_pool_cores()  # the cores are read, and the pool measured, as at start
        try:
            cores = pool_cores(threads, reserve, near_node=self.cpu_node)  # too many: raises
            old_threads = self.cpu_threads
            self._use_cpu_cores(cores)
            self.isolate_pool()
            try:
                self.profile, self.cpu_tile_path = load_or_profile(
                    self.cfg, self.model, self.layout, self.executor, threads, self.max_model_len,
                    cpu_base=self.profile,
                )  # fmt: skip
            except BaseException as exc:
                self.release_pool_cores()
                self._use_cpu_cores(pool_cores(old_threads, reserve, near_node=self.cpu_node))
                if self.cpu_tile_path is not None:
                    use_tile_path(self.cpu_tile_path)
                if isinstance(exc, Exception):
                    raise RuntimeError(
                        f"measuring the CPU pool at {threads} threads failed ({exc}); the pool of "
                        f"{old_threads} threads and its profile stay in force"
                    ) from exc
                raise
        finally:
            if self.other_cpus is None:  # the pool in force, kept apart again (if so configured)
                self.isolate_pool()
        self.scheduler.cost = cost_model_of(self.profile)

    def _use_cpu_cores(self, cores: list[int]) -> None:
        from neod.kernels.cpu_attention import CpuAttention

        assert self.cpu_attention is not None
        self.cpu_attention.close()
        self.cpu_attention = CpuAttention(cores=cores)
        self.executor.cpu_attention = self.cpu_attention
        self.cpu_threads = len(cores)
        set_torch_threads(self.cfg.cpu, len(cores), self.tp_size)


def isolate_pool(
    cpu_cfg: Any, cpu_attention: Any, process_cpus: frozenset[int], world_size: int
) -> frozenset[int] | None:
    """Keep this process's other threads off the CPU pool's cores (neod.cpu.threads) where the
    config asks for it, with one GPU only (tensor-parallel ranks share the cores the pools
    leave); the CPUs they are kept on, or None."""
    from neod.cpu.threads import keep_off_pool

    if cpu_attention is None or world_size > 1 or not cpu_cfg.isolate_pool or not process_cpus:
        return None
    others = keep_off_pool(cpu_attention.cores, cpu_attention.thread_ids(), set(process_cpus))
    if others is None:
        return None
    logger.info("other threads of this process run on CPUs %s", sorted(others))
    return frozenset(others)


def cost_model_of(profile: Profile | None) -> CostModel:
    """The scheduler's costs: the profile's tables, the CPU attention and the pipeline's hand-offs
    corrected as the engine measures them; free where this rank keeps no profile (it schedules
    nothing)."""
    return ZeroCostModel() if profile is None else CalibratedCostModel(TableCostModel(profile))


def gpu_numa_node(device: torch.device) -> int | None:
    """The NUMA node the GPU is attached to; None for a CPU device, a one-node host, or where
    torch or the platform does not tell."""
    from neod.cpu.topology import pci_numa_node

    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    try:
        address = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    except AttributeError:
        return None
    return pci_numa_node(address)


def set_torch_threads(cpu_cfg: Any, pool_threads: int, world_size: int) -> None:
    """torch's own CPU threads get what the pinned pool and the reserved cores leave: OpenMP
    workers that spin on the pool's cores would slow the CPU attention (on a CPU host, the model
    too)."""
    free_cores = len(os.sched_getaffinity(0)) - pool_threads - cpu_cfg.reserve_cores
    torch.set_num_threads(max(1, free_cores // world_size))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"model.device = {name!r} but no CUDA device is visible; use 'auto' or 'cpu'"
        )
    return device


def resolve_dtype(name: str) -> torch.dtype:
    return {
        "auto": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "float32": torch.float32,
    }[name]


def load_model(
    model_cfg: Any, device: torch.device, dtype: torch.dtype, max_positions: int | None
) -> tuple[Any, str]:
    if model_cfg.path:
        logger.info("loading model path=%s device=%s dtype=%s", model_cfg.path, device, dtype)
        return LlamaModel.from_pretrained(
            model_cfg.path, device, dtype, max_positions
        ), model_cfg.path
    logger.info("random weights preset=%s device=%s dtype=%s", model_cfg.preset, device, dtype)
    config = get_preset(model_cfg.preset)
    return LlamaModel.random(
        config, device, dtype, seed=model_cfg.seed, max_positions=max_positions
    ), model_cfg.preset


def activation_bytes(config: Any, max_tokens: int, max_rows: int, itemsize: int) -> int:
    per_token = (
        4 * config.hidden_size + config.q_size + 2 * config.kv_size + 3 * config.intermediate_size
    )
    logits = max_rows * config.vocab_size * 4
    return ACTIVATION_SAFETY_FACTOR * (max_tokens * per_token * itemsize + logits)


def build_runtime(cfg: Any, refresh_profile: bool = False, group: Any = None) -> EngineRuntime:
    """refresh_profile measures this host again even when a stored profile matches. `group` is
    this process's neod.dist.group.RankGroup; without one and with parallel.tp_size > 1, this
    process becomes rank 0 and starts the others."""
    from neod.engine.profiler import load_or_profile, store_pipeline_handoff

    if group is None and cfg.parallel.tp_size > 1:
        from neod.dist.launch import start_tensor_parallel

        return start_tensor_parallel(cfg, refresh_profile)
    world_size = 1 if group is None else group.world_size
    device = resolve_device(cfg.model.device) if group is None else group.device
    dtype = resolve_dtype(cfg.model.dtype)
    max_rows = cfg.scheduler.max_batch_size
    max_tokens = cfg.scheduler.max_tokens_in_batch
    requested_len = cfg.model.max_model_len or None
    load = load_model if group is None else group.load_model
    model, name = load(cfg.model, device, dtype, requested_len)
    mc = model.config
    max_model_len = min(requested_len or mc.max_position_embeddings, model.max_positions)
    layout = KVLayout(
        mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, cfg.cache.block_size, dtype
    )
    itemsize = torch.empty((), dtype=dtype).element_size()
    reserve = activation_bytes(mc, max_tokens, max_rows, itemsize) if device.type == "cuda" else 0
    num_gpu = gpu_pool_blocks(
        layout, device, cfg.cache.gpu_kv_gib, cfg.cache.gpu_memory_utilization, reserve
    )
    if group is not None:  # rank 0 allocates block ids for every rank
        num_gpu = group.agree_min("gpu_blocks", num_gpu)
    gpu_pool = allocate_pool(layout, num_gpu, device)
    cpu_pool = cpu_attention = cpu_node = None
    threads, bandwidth = 0, None  # threads: the whole pool's, over all tensor-parallel ranks
    cores: list[int] = []  # this rank's
    wants_host_pool = cfg.scheduler.policy != "gpu-only" or cfg.cache.cpu_kv_gib > 0
    if wants_host_pool:
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(
                f"policy {cfg.scheduler.policy!r} offloads attention to the CPU, which needs a "
                f"bfloat16 or float16 KV cache; model.dtype is {cfg.model.dtype!r}"
            )
        from neod.cpu import pool_cores, read_topology, recommended_threads
        from neod.kernels.cpu_attention import CpuAttention

        # A CPU-only host has no GPU memory to relieve: a small host pool keeps the demo light.
        on_cpu = device.type == "cpu"
        cpu_kv_gib = cfg.cache.cpu_kv_gib or (CPU_DEVICE_HOST_POOL_GIB if on_cpu else 0.0)
        # One host budget for all ranks: count whole blocks, of which each rank holds its heads.
        whole = replace(layout, num_kv_heads=layout.num_kv_heads * world_size)
        num_cpu = host_pool_blocks(whole, cpu_kv_gib, pinned=device.type == "cuda")
        threads = cfg.cpu.threads or recommended_threads(cfg.cpu.reserve_cores)
        topo = read_topology()
        # Under tensor parallelism the ranks split one core list (group.cores): no preference.
        cpu_node = gpu_numa_node(device) if group is None and len(topo.numa_nodes) > 1 else None
        cores = pool_cores(threads, cfg.cpu.reserve_cores, topo, near_node=cpu_node)
        if group is not None:
            num_cpu = group.agree_min("cpu_blocks", num_cpu)
            cores = group.cores(cores)
        # The pages go where they are first touched: on the GPU's node when the pool has cores
        # there.
        on_node = [c for c in cores if c in topo.numa_nodes.get(cpu_node, ())]
        if cpu_node is not None and on_node:
            logger.info("the GPU is on NUMA node %d: %d of the %d CPU pool threads and the host "
                        "KV pool are there", cpu_node, len(on_node), len(cores))
        elif cpu_node is not None:
            logger.warning("the GPU is on NUMA node %d, where this process may run no CPU pool "
                           "thread (CPU affinity): the host KV pool is remote to it", cpu_node)
        cpu_pool = allocate_pool(
            layout, num_cpu, torch.device("cpu"), pin=device.type == "cuda",
            local_to_cpus=on_node or cores,
        )
        cpu_attention = CpuAttention(cores=cores)
    set_torch_threads(cfg.cpu, threads, world_size)
    process_cpus = frozenset(os.sched_getaffinity(0))
    other_cpus = isolate_pool(cfg.cpu, cpu_attention, process_cpus, world_size)  # as it serves
    logger.info(
        "kv pools gpu_blocks=%d cpu_blocks=%d block_size=%d bytes_per_token=%d cpu_threads=%d",
        num_gpu,
        0 if cpu_pool is None else cpu_pool.shape[1],
        layout.block_size,
        layout.bytes_per_token,
        len(cores),
    )
    executor = Executor(model, gpu_pool, cpu_pool, cpu_attention, max_rows, max_tokens)
    profile, tile_path = load_or_profile(
        cfg, model, layout, executor, len(cores), max_model_len, refresh_profile, group
    )
    # CUDA graphs would capture the all-reduces too: not done, nor validated, with TP.
    if device.type == "cuda" and world_size == 1:
        executor.graphs = DecodeGraphs(model, gpu_pool, max_rows, max_model_len)
        executor.graphs.capture_all()
        if cpu_pool is not None:
            executor.stage_graphs = StageGraphs(model, max_rows)
            executor.stage_graphs.capture_all()
    # Once per profile, with the graphs the engine serves with; not under tensor parallelism,
    # where rank 0 alone cannot run an iteration.
    unmeasured = profile is not None and profile.pipeline_handoff is None
    if cpu_pool is not None and unmeasured and world_size == 1:
        profile = store_pipeline_handoff(cfg, profile, executor, layout, mc.vocab_size, max_rows)
    return EngineRuntime(
        cfg=cfg,
        device=device,
        model=model,
        model_name=name,
        layout=layout,
        vocab_size=mc.vocab_size,
        eos_token_ids=tuple(mc.eos_token_ids),
        max_model_len=max_model_len,
        max_rows=max_rows,
        max_tokens=max_tokens,
        gpu_pool=gpu_pool,
        cpu_pool=cpu_pool,
        cpu_attention=cpu_attention,
        cpu_threads=len(cores),
        cpu_bandwidth_gbps=bandwidth,
        cpu_tile_path=tile_path if cpu_pool is not None else None,
        profile=profile,
        executor=executor,
        scheduler=Scheduler(
            cost_model_of(profile), mc.num_hidden_layers, split_rule=SplitRule.of(cfg.scheduler)
        ),
        cpu_node=cpu_node,
        process_cpus=process_cpus,
        other_cpus=other_cpus,
    )
