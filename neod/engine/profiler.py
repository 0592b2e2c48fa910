"""Measures this host's stage costs with the real model, pools and kernels, for the scheduler's
predictor.

Every point times the code the engine really runs (the model's layer stages, the attention entry
points, the pinned CPU pool, the staging copies), per layer, after a warm-up, as the median of a few
repetitions. CPU attention is timed while a host-to-device copy of the same order as the pipelined
mode's traffic runs, so memory-bandwidth contention is in the table rather than assumed away. The
grid is small and geometric: profiling a new host takes a minute or two, and the result is cached
under a key of everything it depends on.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import torch

from neod.cache.pool import KVLayout
from neod.kernels import cuda_ops, ops
from neod.kernels.cpu_attention import CpuFlight, amx_in_use, use_amx, use_tile_path
from neod.sched import (
    Profile,
    Table1D,
    Table2D,
    describe_cpu_paced,
    load_profile,
    profile_key,
    profile_path,
    save_profile,
)
from neod.sched.calibration import HANDOFF_MAX_S

logger = logging.getLogger(__name__)

KERNEL_VERSION = "8"  # bump when a kernel or what is measured changes: stored profiles go stale
REPEATS = 5
# Layers cost the same, but a timed program must read more KV than the host's caches hold, as
# serving does (a last-level cache of ~100 MB would otherwise serve small points from cache).
CPU_BYTES_TIMED = 1 << 30
TILE_PROBE_CONTEXT = 1024  # tokens per request in the batches that choose the CPU tile path
HANDOFF_PROBE_DECODES = 4  # GPU and CPU decodes of the iteration that times the hand-off
HANDOFF_PROBE_CONTEXT = 1024  # tokens per request in it
HANDOFF_PROBE_REPEATS = 11  # iterations timed (after two to warm up): the GPU hosts are noisy
# GPU decode attention is timed up to this much context even where the GPU pool holds less (a pool
# capped at 0.5 GiB holds 4096 tokens of an 8B model): past a smaller grid's end the predictor
# extrapolates from points where launches, not KV reads, set the time, and a later run with a
# larger pool decodes long contexts 1.5x slower than so predicted. By then the cost is linear in
# the KV read, which extrapolates. The extra points are timed over a scratch cache of a few layers
# whose reads, as the pool's, exceed the GPU's L2 cache; it is freed right after.
GPU_DECODE_GRID_TOKENS = 32768
GPU_DECODE_SCRATCH_LAYERS = 4


def _ladder(top: int, start: int = 1) -> list[int]:
    """1, 2, 4, 8, ... up to top, with top itself last."""
    values, v = [], start
    while v < top:
        values.append(v)
        v *= 2
    return values + [top]


class _Timer:
    """Median time of one call of `fn`, divided by `per_call` (the layers it loops over).

    On a GPU, CUDA events bracket back-to-back calls, so host launch gaps count exactly as they do
    in an eager forward (a host-bound stage is measured as host-bound) and no synchronisation is
    charged. Work the engine replays from CUDA graphs (decode-sized batches: whole steps, or one
    stage per layer when pipelined) is timed the same way, as replays of a graph of `fn`.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(
        self, fn: Callable[[], Any], per_call: int = 1, host: bool = False, graph: bool = False
    ) -> float:
        """host=True times host work (CPU attention) by the wall clock, after the GPU has
        drained; graph=True times replays of a CUDA graph of fn (on a GPU)."""
        if graph and self.cuda:
            try:
                return self._replays(fn) / per_call
            except RuntimeError as exc:  # an op that cannot be captured: its eager time stands
                logger.warning("timing eagerly, graph capture failed: %s", exc)
        fn()  # warm-up (kernel selection, allocator)
        samples = []
        for _ in range(REPEATS):
            if self.cuda and not host:
                samples.append(self._cuda_seconds(fn))
            else:
                begin = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - begin)
        return statistics.median(samples) / per_call

    def _replays(self, fn: Callable[[], Any]) -> float:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: lazy initialisation, workspaces
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        return statistics.median(self._cuda_seconds(graph.replay) for _ in range(REPEATS))

    @staticmethod
    def _cuda_seconds(fn: Callable[[], Any]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


class Profiler:
    def __init__(
        self,
        model: Any,
        layout: KVLayout,
        executor: Any,
        max_tokens: int,
        max_rows: int,
        max_model_len: int,
        graphs: bool = True,
        tile_paths: Sequence[str | None] | None = None,
    ) -> None:
        """graphs: time decode-sized work as CUDA graph replays, as the engine runs it (off under
        tensor parallelism, where the engine runs eagerly). tile_paths: the CPU tile paths to
        choose from (names as `amx_in_use` gives them); default: the one selected now."""
        self.model = model
        self.graphs = graphs
        self.cfg = model.config
        self.layout = layout
        self.executor = executor
        self.device = model.device
        self.max_tokens = max_tokens
        self.max_rows = max_rows
        self.max_model_len = max_model_len
        self.time = _Timer(self.device)
        self.num_layers = self.cfg.num_hidden_layers
        self.tile_paths = tuple(tile_paths) if tile_paths else (amx_in_use(),)
        self._seqs = itertools.count(1)  # flag values of successive timed CPU programs

    def _hidden(self, num_tokens: int) -> torch.Tensor:
        return (
            torch.randn(
                num_tokens, self.cfg.hidden_size, device=self.device, dtype=self.model.dtype
            )
            * 0.1
        )

    def linear(self) -> dict[int, float]:
        """pre + post projections of one layer for a sub-batch of T tokens."""
        table = {}
        for t in _ladder(self.max_tokens):
            hidden, positions = (
                self._hidden(t),
                torch.arange(t, device=self.device) % self.max_model_len,
            )
            attn = torch.randn(t, self.cfg.q_size, device=self.device, dtype=self.model.dtype) * 0.1
            run = functools.partial(self._linear_layers, hidden, positions, attn)
            table[t] = self.time(run, self.num_layers, graph=self.graphs and t <= self.max_rows)
        return table

    def _linear_layers(
        self, hidden: torch.Tensor, positions: torch.Tensor, attn: torch.Tensor
    ) -> None:
        """The timed work of `linear`: pre + post of every layer."""
        # hidden: [T, H], positions: [T], attn: [T, Hq * D]
        for i in range(self.num_layers):
            _, _, _, residual = self.model.layer_pre(i, hidden, None, positions)
            self.model.layer_post(i, attn, residual)

    def prefill_attention(self) -> dict[int, float]:
        """Causal attention of one prompt of S tokens, one layer."""
        cfg, table = self.cfg, {}
        for s in _ladder(min(self.max_tokens, self.max_model_len), start=16):
            q = torch.randn(
                s, cfg.num_attention_heads, cfg.head_dim, device=self.device, dtype=self.model.dtype
            )
            k = torch.randn(
                s, cfg.num_key_value_heads, cfg.head_dim, device=self.device, dtype=self.model.dtype
            )
            cu = torch.tensor([0, s], dtype=torch.int32, device=self.device)
            run = functools.partial(self._prefill_layers, q, k, cu, s)
            table[s] = self.time(run, self.num_layers)
        return table

    def _prefill_layers(self, q: torch.Tensor, k: torch.Tensor, cu: torch.Tensor, s: int) -> None:
        """The timed work of `prefill_attention`: one prompt's causal attention per layer."""
        # q: [S, Hq, D], k (also used as V): [S, Hkv, D], cu: [2] int32
        for _ in range(self.num_layers):
            ops.prefill_attention(q, k, k, cu, s, self.cfg.head_dim**-0.5)

    def _decode_inputs(
        self, pool: torch.Tensor, num_seqs: int, ctx: int
    ) -> tuple[torch.Tensor, ...]:
        """num_seqs requests sharing ctx context tokens, laid over the pool's first blocks."""
        bs, num_blocks = self.layout.block_size, pool.shape[1]
        per_seq = max(1, ctx // num_seqs)
        blocks_per_seq = -(-per_seq // bs)
        ids = torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32) % num_blocks
        tables = ids.view(num_seqs, blocks_per_seq)
        lens = torch.full((num_seqs,), per_seq, dtype=torch.int32)
        q = torch.randn(num_seqs, self.cfg.num_attention_heads, self.cfg.head_dim, dtype=pool.dtype)
        return q, tables, lens

    def _decode_grid(self, capacity_tokens: int) -> list[tuple[int, int]]:
        points = []
        for b in _ladder(self.max_rows):
            for ctx in _ladder(min(capacity_tokens, b * self.max_model_len), start=max(b, 16)):
                points.append((b, ctx))
        return points

    def gpu_decode(self) -> dict[tuple[int, int], float]:
        pool, bs = self.executor.gpu_pool, self.layout.block_size
        capacity = pool.shape[1] * bs
        table = self._gpu_decode_over(pool, self._decode_grid(capacity))
        if capacity >= GPU_DECODE_GRID_TOKENS or self.device.type != "cuda":
            return table
        blocks = GPU_DECODE_GRID_TOKENS // bs
        try:
            scratch = torch.zeros(
                (GPU_DECODE_SCRATCH_LAYERS, blocks, *pool.shape[2:]), dtype=pool.dtype,
                device=self.device,
            )  # fmt: skip
        except torch.cuda.OutOfMemoryError:
            logger.info("no GPU memory to time decode attention past the pool's %d tokens: "
                        "longer contexts are extrapolated", capacity)  # fmt: skip
            return table
        longer = [(b, ctx) for b, ctx in self._decode_grid(blocks * bs) if ctx > capacity]
        table.update(self._gpu_decode_over(scratch, longer))
        del scratch
        torch.cuda.empty_cache()  # the activations' reserve, lent for the measurement
        return table

    def _gpu_decode_over(
        self, pool: torch.Tensor, grid: list[tuple[int, int]]
    ) -> dict[tuple[int, int], float]:
        table = {}
        for b, ctx in grid:
            q, tables, lens = self._decode_inputs(pool, b, ctx)
            q, tables, lens = q.to(self.device), tables.to(self.device), lens.to(self.device)
            run = functools.partial(self._gpu_decode_layers, q, pool, tables, lens)
            table[(b, ctx)] = self.time(run, self.num_layers, graph=self.graphs)
        return table

    def _gpu_decode_layers(
        self, q: torch.Tensor, pool: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor
    ) -> None:
        """The timed work of `gpu_decode`: paged decode attention per layer (a scratch cache of
        fewer layers is read in turn)."""
        # q: [B, Hq, D], pool: [L, N, 2, Hkv, bs, D], tables: [B, blocks] int32, lens: [B] int32
        for i in range(self.num_layers):
            layer = pool[i % pool.shape[0]]
            ops.paged_decode_attention(q, layer, tables, lens, self.cfg.head_dim**-0.5)

    def cpu_decode(self) -> dict[tuple[int, int], float]:
        """CPU attention through the engine's own path (one `decode_layers` program over several
        layers), each layer's inputs already in place, so that its steps run back to back as in an
        iteration the CPU paces, while host-to-device copies compete for memory bandwidth (on a
        GPU host)."""
        capacity = self.executor.cpu_pool.shape[1] * self.layout.block_size
        return {(b, ctx): self._cpu_point(b, ctx) for b, ctx in self._decode_grid(capacity)}

    def choose_tile_path(self) -> tuple[str | None, dict[str, float]]:
        """Of the candidate tile paths, the one under which the engine's CPU program attends
        offload-sized batches (8 and 32 requests of ~1k tokens) fastest; it stays selected.

        Timed, not assumed: on hosts whose hyperthreads share a core's AMX unit, moving the V
        products onto AMX too can lose where the kernel alone on one thread wins."""
        if len(self.tile_paths) == 1:
            return self.tile_paths[0], {}
        capacity = self.executor.cpu_pool.shape[1] * self.layout.block_size
        points = {
            (b, max(16, min(capacity, b * TILE_PROBE_CONTEXT)))
            for b in (min(8, self.max_rows), min(32, self.max_rows))
        }
        seconds = {}
        for path in self.tile_paths:
            use_tile_path(path)
            seconds[str(path)] = sum(self._cpu_point(b, ctx) for b, ctx in sorted(points))
        best = min(self.tile_paths, key=lambda path: seconds[str(path)])
        use_tile_path(best)
        logger.info(
            "cpu tile path %s (probe ms per layer: %s)",
            best,
            ", ".join(f"{path} {s * 1e3:.3f}" for path, s in seconds.items()),
        )
        return best, seconds

    def _cpu_point(self, b: int, ctx: int) -> float:
        """Seconds per layer of the CPU program for b requests sharing ctx context tokens.

        It only reads: the engine's program also appends each request's new K/V (b rows, against
        ctx rows read), but a resized pool is measured while serving, over blocks that live
        requests own."""
        pool, attention = self.executor.cpu_pool, self.executor.cpu_attention
        layer_bytes = ctx * self.layout.bytes_per_token // self.num_layers
        layers = min(self.num_layers, -(-CPU_BYTES_TIMED // layer_bytes))
        q, tables, lens = self._decode_inputs(pool, b, ctx)
        flight = CpuFlight(
            q=q, k_new=None, v_new=None, out=torch.empty_like(q), block_tables=tables,
            seq_lens=lens, ready=torch.zeros(layers, dtype=torch.int32),
            done=torch.zeros(layers, dtype=torch.int32),
        )  # fmt: skip
        run = functools.partial(
            self._cpu_decode_layers, attention, pool[:layers], flight, self._seqs, self._contention
        )
        return self.time(run, layers, host=True)

    @functools.cached_property
    def _contention(self) -> Callable[[int], None] | None:
        """Host-to-device copies of a prefill's KV of one layer each, per timed layer, on a side
        stream (on a GPU host; None elsewhere)."""
        if self.device.type != "cuda":
            return None
        src = torch.empty(4 << 20, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty_like(src, device=self.device)
        stream = torch.cuda.Stream(self.device)

        def contention(layers: int) -> None:
            with torch.cuda.stream(stream):
                for _ in range(layers):
                    dst.copy_(src, non_blocking=True)

        return contention

    @staticmethod
    def _cpu_decode_layers(
        attention: Any,
        pool: torch.Tensor,
        flight: CpuFlight,
        seqs: Iterator[int],
        contention: Callable[[int], None] | None,
    ) -> None:
        """The timed work of `cpu_decode`: one program over the pool's layers, every layer ready
        at once, started alongside competing host-to-device copies when `contention` is given."""
        # pool: [layers, N, 2, Hkv, bs, D] host; flight.ready / flight.done: [layers]
        seq = next(seqs)
        flight.ready.fill_(seq)
        if contention is not None:
            contention(pool.shape[0])
        attention.decode_layers(pool, [flight], seq)

    def transfer(self) -> dict[int, float]:
        """Q/K/V of B CPU-decoded rows to the host and their output back, one layer, with the
        handshake the engine makes between them when a CPU pool exists: the copy stream sets a
        ready flag, the CPU program answers with a done flag (here at once: no rows to attend),
        the GPU waits for it. That round trip costs the latency of each device polling the other,
        which a pure copy time leaves out."""
        cfg, table = self.cfg, {}
        if self.device.type != "cuda":
            return dict.fromkeys(_ladder(self.max_rows), 0.0)
        pool, attention = self.executor.cpu_pool, self.executor.cpu_attention
        width_out, width_in = cfg.q_size + 2 * cfg.kv_size, cfg.q_size
        seqs = itertools.count(1)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="neod-profile") as cpu_thread:
            for b in _ladder(self.max_rows):
                dev_in = torch.empty(b, width_out, device=self.device, dtype=self.model.dtype)
                host_in = torch.empty(b, width_out, dtype=self.model.dtype, pin_memory=True)
                host_out = torch.empty(b, width_in, dtype=self.model.dtype, pin_memory=True)
                dev_out = torch.empty(b, width_in, device=self.device, dtype=self.model.dtype)
                copies = (dev_in, host_in, host_out, dev_out)
                if pool is None:
                    run = functools.partial(self._transfer_layers, *copies, None)
                else:
                    flight = self._empty_flight(pool)
                    handshake = (attention, pool, flight, seqs, cpu_thread)
                    run = functools.partial(self._transfer_layers, *copies, handshake)
                table[b] = self.time(run, self.num_layers)
        return table

    def _empty_flight(self, pool: torch.Tensor) -> CpuFlight:
        cfg = self.cfg

        def rows(heads: int) -> torch.Tensor:
            return torch.empty((0, heads, cfg.head_dim), dtype=pool.dtype)

        def flags() -> torch.Tensor:  # written by the GPU: pinned
            return torch.zeros(self.num_layers, dtype=torch.int32, pin_memory=True)

        return CpuFlight(
            q=rows(cfg.num_attention_heads), k_new=rows(cfg.num_key_value_heads),
            v_new=rows(cfg.num_key_value_heads), out=rows(cfg.num_attention_heads),
            block_tables=torch.zeros((0, 1), dtype=torch.int32),
            seq_lens=torch.zeros(0, dtype=torch.int32), ready=flags(), done=flags(),
        )  # fmt: skip

    def _transfer_layers(
        self,
        dev_in: torch.Tensor,
        host_in: torch.Tensor,
        host_out: torch.Tensor,
        dev_out: torch.Tensor,
        handshake: tuple | None,
    ) -> None:
        """The timed work of `transfer`: Q/K/V to the host and the output back, per layer, each
        pair joined by the flag handshake when `handshake` (attention, pool, flight, seqs, thread)
        is given."""
        # dev_in, host_in: [B, (Hq + 2 * Hkv) * D]; host_out, dev_out: [B, Hq * D]
        if handshake is None:
            for _ in range(self.num_layers):
                host_in.copy_(dev_in, non_blocking=True)
                dev_out.copy_(host_out, non_blocking=True)
            return
        attention, pool, flight, seqs, cpu_thread = handshake
        seq = next(seqs)
        program = cpu_thread.submit(attention.decode_layers, pool, [flight], seq, 10.0)
        stream = torch.cuda.current_stream(self.device)
        for layer in range(self.num_layers):
            host_in.copy_(dev_in, non_blocking=True)
            cuda_ops.stream_write_flag(flight.ready, layer, seq, stream)
            cuda_ops.stream_wait_flag(flight.done, layer, seq, stream)
            dev_out.copy_(host_out, non_blocking=True)
        program.result()

    def overhead(self) -> dict[int, float]:
        """Per-iteration work outside the layers: embedding, final norm, LM head, for B
        sequences."""
        table = {}
        for b in _ladder(self.max_rows):
            ids = torch.zeros(b, dtype=torch.int64, device=self.device)
            rows = torch.arange(b, device=self.device)
            table[b] = self.time(functools.partial(self._overhead_once, ids, rows))
        return table

    def _overhead_once(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """The timed work of `overhead`: embedding, then final norm and LM head."""
        # ids: [B] int64, rows: [B] int64
        hidden = self.model.embed(ids)
        self.model.final(hidden, torch.zeros_like(hidden), rows)

    def swap(self) -> dict[int, float]:
        """Blocks of one layer between the pools (device to host; the other direction costs the
        same)."""
        pool, host = self.executor.gpu_pool, self.executor.cpu_pool
        if host is None or self.device.type != "cuda":
            return dict.fromkeys(_ladder(256), 0.0)
        table = {}
        for n in _ladder(min(256, pool.shape[1], host.shape[1])):
            pairs = torch.stack([torch.arange(n), torch.arange(n)], dim=1)
            run = functools.partial(self._swap_layers, pool, host, pairs)
            table[n] = self.time(run, self.num_layers)
        return table

    def _swap_layers(self, pool: torch.Tensor, host: torch.Tensor, pairs: torch.Tensor) -> None:
        """The timed work of `swap`: the blocks of each layer, one layer at a time."""
        # pairs: [n, 2] int64 (src block, dst block)
        for i in range(self.num_layers):
            ops.swap_blocks(pool, host, pairs, layers=[i])

    def run(self, key) -> Profile:
        start = time.perf_counter()
        with torch.inference_mode():
            profile = Profile(
                key=key,
                linear=Table1D.from_points(self.linear()),
                prefill_attn=Table1D.from_points(self.prefill_attention()),
                gpu_decode_attn=Table2D.from_points(self.gpu_decode()),
                transfer=Table1D.from_points(self.transfer()),
                swap=Table1D.from_points(self.swap()),
                iteration_overhead=Table1D.from_points(self.overhead()),
                meta={"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
            )
            if self.executor.cpu_pool is not None:
                profile = self._with_cpu_side(profile)
        seconds = time.perf_counter() - start
        logger.info("profiled this host in %.1f s", seconds)
        return replace(profile, meta={**profile.meta, "duration_s": round(seconds, 2)})

    def run_cpu(self, key, base: Profile) -> Profile:
        """`base` with its CPU side measured again: all that a resized CPU pool changes."""
        with torch.inference_mode():
            profile = self._with_cpu_side(replace(base, key=key))
        logger.info("profiled the CPU pool again in %.1f s", profile.meta["cpu_duration_s"])
        return profile

    def _with_cpu_side(self, profile: Profile) -> Profile:
        """The tile path chosen, then the CPU attention table measured under it."""
        start = time.perf_counter()
        tile_path, tile_seconds = self.choose_tile_path()
        return replace(
            profile,
            cpu_decode_attn=Table2D.from_points(self.cpu_decode()),
            cpu_tile_path=tile_path,
            meta={
                **profile.meta,
                "cpu_measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "cpu_duration_s": round(time.perf_counter() - start, 2),
                "cpu_tile_probe_s": tile_seconds,
            },
        )


def select_tile_paths(cpu_cfg: Any) -> tuple[str | None, ...]:
    """Selects the CPU tile path the `cpu` config section asks for on this host and returns the
    candidates the profile chooses from: two when `amx_values` is auto and AMX is available, else
    the one selected."""
    use_amx(cpu_cfg.amx, values=cpu_cfg.amx_values != "off")
    path = amx_in_use()
    if cpu_cfg.amx_values == "auto" and path == "scores+values":
        return ("scores+values", "scores")
    return (path,)


def host_key(
    model: Any,
    layout: KVLayout,
    threads: int,
    tp: int = 1,
    tile_paths: Sequence[str | None] | None = None,
) -> Any:
    """Everything a profile depends on: another model, GPU, CPU, tensor-parallel degree, kernel or
    tile paths to choose from gets a new profile. Under tensor parallelism `model` is one
    rank's shard."""
    import platform

    cfg = model.config
    gpu = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "none"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu
            )
    except OSError:
        pass
    shape = {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
    }
    return profile_key(
        shape,
        str(layout.dtype).removeprefix("torch."),
        tp,
        gpu,
        f"{cpu} x{os.cpu_count()}",
        threads,
        KERNEL_VERSION + _tile_tag(tile_paths or (amx_in_use(),)),
        layout.block_size,
    )


def _tile_tag(paths: Sequence[str | None]) -> str:
    if len(paths) > 1:
        return "-amx-auto"
    return f"-amx-{paths[0]}" if paths[0] else ""


def load_or_profile(
    cfg: Any,
    model: Any,
    layout: KVLayout,
    executor: Any,
    threads: int,
    max_model_len: int,
    refresh: bool = False,
    group: Any = None,
    cpu_base: Profile | None = None,
) -> tuple[Profile | None, str | None]:
    """The stored profile for exactly this setup, or a fresh one measured now and stored, and the
    CPU tile path it was measured with, which stays selected.

    `cpu_base`: the profile in force when only the CPU pool changed since (its thread count); a
    fresh profile then measures just the CPU side and keeps the GPU tables of `cpu_base`.

    With tensor parallelism (`group`, a neod.dist.group.RankGroup) rank 0 decides and keeps the
    profile; the other ranks measure in step with it (the projections' all-reduces need every
    rank, and their CPU pools load the memory bus as they will when serving), then drop theirs
    (None): they schedule nothing, and take rank 0's tile path."""
    from neod.config import profile_dir

    tile_paths = select_tile_paths(cfg.cpu)
    key = host_key(model, layout, threads, 1 if group is None else group.world_size, tile_paths)
    path = profile_path(profile_dir(cfg), key)
    leads = group is None or group.rank == 0
    profile = None if refresh or not leads else load_profile(path, key)
    measure = profile is None
    if group is not None:
        measure = group.leader_decides("profile", measure)
    if measure:
        logger.info(
            "profiling this host for %s (no stored profile at %s)", key.short_id(), path
        )
        profiler = Profiler(
            model,
            layout,
            executor,
            cfg.scheduler.max_tokens_in_batch,
            cfg.scheduler.max_batch_size,
            max_model_len,
            graphs=group is None or group.world_size == 1,
            tile_paths=tile_paths,
        )
        profile = profiler.run(key) if cpu_base is None else profiler.run_cpu(key, cpu_base)
        if leads:
            save_profile(profile, path)
    elif leads:
        logger.info("profile reused path=%s", path)
    tile_path = tile_paths[0]  # also what a profile measured without a host pool stands for
    if len(tile_paths) > 1:
        if profile is not None and profile.cpu_tile_path in tile_paths:
            tile_path = profile.cpu_tile_path
        if group is not None:
            values = group.leader_decides("amx_values", tile_path == "scores+values")
            tile_path = "scores+values" if values else "scores"
        use_tile_path(tile_path)
    return (profile if leads else None), tile_path


def store_pipeline_handoff(
    cfg: Any, profile: Profile, executor: Any, layout: KVLayout, vocab_size: int, max_rows: int
) -> Profile:
    """`profile` with the engine's pipelined iteration timed, and stored: run whole (after its
    CUDA graphs are captured, as it serves) with a few sizes of CPU sub-batch, for the CPU
    program as that iteration paces it (`cpu_paced`), and against the bound the paced tables
    give it, for the hand-off. Only at start: the probes write K/V into both pools."""
    from neod.config import profile_dir

    start = time.perf_counter()
    with torch.inference_mode():
        probes = _pipelined_probes(executor, layout, vocab_size, max_rows)
    paced = _cpu_paced(profile, probes)
    profile = replace(profile, cpu_paced=paced)
    handoff = _pipeline_handoff(profile, probes, layout.num_layers)
    logger.info(
        "%s; pipelined sub-batches hand off in %.0f us per layer beyond their copies on this "
        "host (timed in %.1f s)",
        describe_cpu_paced(paced),
        handoff * 1e6,
        time.perf_counter() - start,
    )
    profile = replace(
        profile,
        pipeline_handoff=handoff,
        meta={**profile.meta, "handoff_measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    )
    save_profile(profile, profile_path(profile_dir(cfg), profile.key))
    return profile


@dataclass(frozen=True)
class PipelinedProbe:
    """One pipelined iteration, timed: `gpu_decodes` GPU decodes in sub-batch 0 and `per_side`
    CPU decodes in each sub-batch, every request at `context` tokens."""

    gpu_decodes: int
    per_side: int
    context: int
    wall_s: float  # median iteration, to its sampled tokens on the host
    cpu_run_s: float  # median CPU busy time per run: one sub-batch through one layer


def _pipelined_probes(
    executor: Any, layout: KVLayout, vocab_size: int, max_rows: int
) -> list[PipelinedProbe]:
    """The probes where the split starts to offload: HANDOFF_PROBE_DECODES GPU decodes and 1, half
    as many and as many CPU decodes per sub-batch, so the GPU's stream and the round trips, not
    the CPU's own work, set the hand-off probe's period; those the pools cannot hold left out."""
    n = min(HANDOFF_PROBE_DECODES, max_rows // 2)
    if n < 2:
        return []
    probes = (_probe(executor, layout, vocab_size, n, k) for k in sorted({1, n // 2, n}))
    return [p for p in probes if p is not None]


def _probe(
    executor: Any, layout: KVLayout, vocab_size: int, gpu_decodes: int, per_side: int
) -> PipelinedProbe | None:
    from neod.engine.batch import build_sub_batch
    from neod.engine.sequence import decoding_sequences

    bs, n = layout.block_size, gpu_decodes
    gpu_blocks, cpu_blocks = executor.gpu_pool.shape[1], executor.cpu_pool.shape[1]
    ctx = min(HANDOFF_PROBE_CONTEXT, min(gpu_blocks // n, cpu_blocks // (2 * per_side)) * bs)
    if ctx < bs:
        return None
    gpu_seqs = decoding_sequences(n, ctx, bs, 0, vocab_size)
    cpu_seqs = decoding_sequences(2 * per_side, ctx, bs, 0, vocab_size, first_id=n)
    device = executor.gpu_pool.device
    batches = [
        build_sub_batch([], [], gpu_seqs, cpu_seqs[:per_side], bs, device),
        build_sub_batch([], [], [], cpu_seqs[per_side:], bs, device),
    ]
    walls, busy = [], []
    counters = executor.cpu_busy_s, executor.cpu_worker_s, executor.cpu_capacity_s
    for i in range(2 + HANDOFF_PROBE_REPEATS):  # two to warm up
        begin, busy_before = time.perf_counter(), executor.cpu_busy_s
        for logits in executor.run(batches):
            logits.argmax(dim=-1).cpu()  # what sampling waits for
        if i >= 2:
            walls.append(time.perf_counter() - begin)
            busy.append(executor.cpu_busy_s - busy_before)
    # The pool's statistics are the serving's.
    executor.cpu_busy_s, executor.cpu_worker_s, executor.cpu_capacity_s = counters
    runs = 2 * layout.num_layers
    return PipelinedProbe(
        n, per_side, ctx, statistics.median(walls), statistics.median(busy) / runs
    )


def _cpu_paced(profile: Profile, probes: Sequence[PipelinedProbe]) -> tuple[float, float] | None:
    """(scale, fixed) of the probes' CPU runs over the table's back-to-back time (neod.sched.
    calibration's fit and bounds); None without a probe that ran CPU work."""
    from neod.sched import TableCostModel
    from neod.sched.calibration import fit_cpu_runs

    table = TableCostModel(replace(profile, cpu_paced=None))
    points = [
        (table.cpu_decode_attn_s(p.per_side, p.per_side * p.context), p.cpu_run_s)
        for p in probes
        if p.cpu_run_s > 0.0
    ]
    return fit_cpu_runs(points) if points else None


def _pipeline_handoff(profile: Profile, probes: Sequence[PipelinedProbe], layers: int) -> float:
    """The hand-off per sub-batch with CPU work and layer (neod.sched.cost) that makes the
    predicted period of the probe with half as many CPU decodes per sub-batch as GPU decodes the
    measured one, within 0 and HANDOFF_MAX_S; 0 without that probe."""
    from neod.sched import TableCostModel
    from neod.sched.cost import BatchLoad, pipelined_s

    probe = next((p for p in probes if p.per_side == p.gpu_decodes // 2), None)
    if probe is None:
        return 0.0
    n, k, ctx = probe.gpu_decodes, probe.per_side, probe.context
    load0 = BatchLoad().plus_gpu_decodes(n, n * ctx).plus_cpu_decodes(k, k * ctx)
    load1 = BatchLoad().plus_cpu_decodes(k, k * ctx)

    def predicted(handoff: float) -> float:
        cost = TableCostModel(replace(profile, pipeline_handoff=handoff))
        return pipelined_s(cost, layers, load0, load1, 0)

    # The period never falls as the hand-off grows: bisection.
    low, high = 0.0, HANDOFF_MAX_S
    if predicted(low) >= probe.wall_s:
        return low
    if predicted(high) <= probe.wall_s:
        return high
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if predicted(mid) < probe.wall_s else (low, mid)
    return high
