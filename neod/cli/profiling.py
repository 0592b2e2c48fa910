"""`neoctl profile` and `neoctl predict`: this host's measured costs, and what they mean.

Both work offline, from the configuration, without a running daemon: `profile` loads the model and
the KV pools itself to measure them (stop neod first: they compete for GPU memory), and stores the
profile where neod looks for it at start; `predict` reads that stored profile and answers the
operator's question before turning NEO on: for this workload and this GPU KV budget, how fast is
GPU-only, how fast NEO?
"""

from __future__ import annotations

import logging
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import typer

from neod.cli.common import Ctl, echo_json, fail

GIB = 1 << 30


def _model_config(cfg: Any) -> Any:
    from neod.model.config import ModelConfig
    from neod.model.presets import get_preset

    return (
        ModelConfig.from_pretrained(cfg.model.path)
        if cfg.model.path
        else get_preset(cfg.model.preset)
    )


def _stored_profile(cfg: Any) -> tuple[Any, Any, Any]:
    """(profile or None, KV layout, its path) for the configured model on this host."""
    from neod.cache.pool import KVLayout
    from neod.config import profile_dir
    from neod.cpu import recommended_threads
    from neod.dist.sharding import shard_config
    from neod.engine.profiler import host_key, select_tile_paths
    from neod.engine.runtime import resolve_device, resolve_dtype
    from neod.sched import load_profile, profile_path

    tp = cfg.parallel.tp_size
    mc = shard_config(_model_config(cfg), tp)  # rank 0's shard is what its profile describes
    device, dtype = resolve_device(cfg.model.device), resolve_dtype(cfg.model.dtype)
    layout = KVLayout(
        mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, cfg.cache.block_size, dtype
    )
    threads = cfg.cpu.threads or recommended_threads(cfg.cpu.reserve_cores)
    rank0_threads = -(-threads // tp)  # rank 0 takes the larger share of the pool's cores
    paths = select_tile_paths(cfg.cpu)
    key = host_key(SimpleNamespace(config=mc, device=device), layout, rank0_threads, tp, paths)
    path = profile_path(profile_dir(cfg), key)
    return load_profile(path, key), layout, path


def _measured_corrections(ctl: Ctl, profile: Any, profile_file: Any) -> dict[str, Any]:
    """The running neod's corrections of this profile, else those the last neod kept beside it
    (neod/engine/corrections.py)."""
    status = ctl.call_if_running("status")
    if status is not None:
        return _live_corrections(status, profile.key.short_id())
    from neod.sched import CalibratedCostModel, TableCostModel, corrections_path, load_corrections

    stored = CalibratedCostModel(TableCostModel(profile))
    path = corrections_path(profile_file)
    if not load_corrections(stored, profile, path):
        fail(f"neod is not running and no corrections of profile {profile.key.short_id()} are "
             f"stored at {path}: start neod (it keeps them while serving), or leave out "
             "--as-measured")
    return {
        "source": "stored",
        "cpu_scale": stored.cpu_scale,
        "cpu_fixed_us": round(stored.cpu_fixed_s * 1e6, 1),
        "cpu_samples": stored.cpu_samples,
        "handoff_us": round(stored.handoff_s * 1e6, 1),
        "handoff_samples": stored.handoff_samples,
    }


def _live_corrections(status: dict[str, Any], profile_id: str) -> dict[str, Any]:
    """The running neod's corrections of this profile, from its status; they apply only to the
    profile it decides from."""
    engine = status.get("engine") or {}
    running = (engine.get("profile") or {}).get("id")
    if running != profile_id:
        fail(f"the running neod decides from profile {running or 'none'}, not from this host's "
             f"stored profile {profile_id}: its measurements do not correct this one")
    scale = engine.get("cpu_cost_scale") or {}
    handoff = engine.get("pipeline_handoff") or {}
    return {
        "source": "running",
        "cpu_scale": scale.get("measured_over_profiled", 1.0),
        "cpu_fixed_us": scale.get("fixed_us", 0.0),
        "cpu_samples": scale.get("samples", 0),
        "handoff_us": handoff.get("per_layer_us", 0.0),
        "handoff_samples": handoff.get("samples", 0),
    }


def _host_ms(obj: Ctl) -> float:
    """The running neod's own time per iteration around the forward, else none."""
    status = obj.call_if_running("status") or {}
    iterations = (status.get("engine") or {}).get("iterations") or {}
    return iterations.get("median_host_ms") or 0.0


def _simulated_batch(
    cost: Any, layout: Any, gpu_bytes: int, cpu_bytes: int, limits: Any, requests: list,
    host_ms: float, split_rule: Any,
) -> dict[str, Any]:
    """The batch through the scheduler under gpu-only and auto (neod.sched.simulate)."""
    from neod.sched.simulate import simulate_policies

    runs = simulate_policies(
        cost, layout.num_layers, gpu_bytes // layout.block_bytes, cpu_bytes // layout.block_bytes,
        layout.block_size, limits, requests, dict.fromkeys(("gpu-only", "auto"), host_ms * 1e-3),
        split_rule,
    )  # fmt: skip
    base = runs["gpu-only"]["output_tokens_per_s"]
    gain = runs["auto"]["output_tokens_per_s"] / base if base > 0 else None
    return {"num_requests": len(requests), "host_ms": host_ms, **runs, "gain": gain}


def _render_prediction(p: dict[str, Any]) -> str:
    g, n = p["gpu_only"], p["neo"]
    mode = "pipelined" if n["pipelined"] else "sequential"
    gain = "n/a" if p["gain"] is None else f"{p['gain']:.2f}x"
    c = p.get("measured_corrections")
    corrected = [] if c is None else [
        f"as {'the running' if c['source'] == 'running' else 'the last'} neod measured: "
        f"CPU attention {c['cpu_scale']:.2f}x the profile + {c['cpu_fixed_us']:g} us per "
        f"sub-batch layer ({c['cpu_samples']} iterations), pipeline hand-offs "
        f"+{c['handoff_us']:g} us ({c['handoff_samples']} iterations)"
    ]
    untimed = [] if p.get("handoff_timed", True) else [
        "note: this profile's pipeline hand-off is not timed yet (neod times it at its next "
        "start); the prediction leaves it out, which flatters pipelining"
    ]
    return "\n".join(
        [
            *corrected,
            *untimed,
            f"workload: input {p['input_len']} tokens, output {p['output_len']} tokens",
            f"gpu-only: {g['tokens_per_s']:8.1f} tok/s  batch {g['gpu_batch']} "
            f"(bound by {g['bound']}), "
            f"iteration {g['iteration_s'] * 1e3:.2f} ms",
            f"neo:      {n['tokens_per_s']:8.1f} tok/s  batch {n['gpu_batch']} GPU + "
            f"{n['cpu_batch']} CPU "
            f"({mode}, CPU bound by {n['cpu_bound']}), iteration {n['iteration_s'] * 1e3:.2f} ms",
            f"gain {gain}: use policy {p['mode']} (auto decides this per iteration)",
            *_render_batch(p.get("batch")),
        ]
    )


def _render_batch(b: dict[str, Any] | None) -> list[str]:
    if b is None:
        return []
    gain = "n/a" if b["gain"] is None else f"{b['gain']:.2f}x"
    ttft = " / ".join(
        "-" if b[p]["ttft_p50_s"] is None else f"{b[p]['ttft_p50_s']:.2f}"
        for p in ("gpu-only", "auto")
    )
    unservable = max(b["gpu-only"]["unservable"], b["auto"]["unservable"])
    return [
        f"a batch of {b['num_requests']} sent at once, through the scheduler: gpu-only "
        f"{b['gpu-only']['output_tokens_per_s']:.1f} tok/s, auto "
        f"{b['auto']['output_tokens_per_s']:.1f} tok/s ({gain}), first tokens after {ttft} s "
        f"(median), {b['host_ms']:g} ms of host time per iteration"
        + (f"; {unservable} of them cannot be served under these limits" if unservable else "")
    ]


def register(app: typer.Typer) -> None:
    @app.command()
    def profile(
        ctx: typer.Context,
        json_out: bool = typer.Option(False, "--json", help="print the stored profile"),
    ) -> None:
        """Measure this host's stage costs for the configured model and store them for neod.

        Loads the model and the KV pools: run it while neod is stopped."""
        from neod.engine.runtime import build_runtime
        from neod.sched import describe_cpu_paced

        obj: Ctl = ctx.obj
        cfg = obj.config()
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
        try:
            runtime = build_runtime(cfg, refresh_profile=True)
        except (RuntimeError, ValueError, MemoryError, OSError) as exc:
            fail(f"profiling failed: {exc}")
        runtime.close()  # stops the other tensor-parallel ranks, if any
        stored, _, path = _stored_profile(cfg)
        if stored is None:
            fail(f"the profile was measured but could not be read back from {path}")
        if json_out:
            echo_json(stored.to_json())
            return
        handoff, paced = stored.pipeline_handoff, stored.cpu_paced
        typer.echo(
            f"profile of {runtime.model_name} on {runtime.device} stored at {path} "
            f"(measured in {stored.meta.get('duration_s', '?')} s)"
            + ("" if handoff is None else f"; pipeline hand-offs +{handoff * 1e6:.0f} us")
            + ("" if paced is None else f"; {describe_cpu_paced(paced)}")
        )

    @app.command()
    def predict(
        ctx: typer.Context,
        input_len: int = typer.Option(1000, min=1, help="mean prompt tokens"),
        output_len: int = typer.Option(200, min=1, help="mean output tokens"),
        gpu_kv_gib: float = typer.Option(
            0.0, min=0.0, help="GPU KV budget of each GPU (default: cache.gpu_kv_gib)"
        ),
        cpu_kv_gib: float = typer.Option(
            0.0,
            min=0.0,
            help="host KV pool, all GPUs' together (default: cache.cpu_kv_gib, else what this "
            "host allows)",
        ),
        as_measured: bool = typer.Option(
            False,
            "--as-measured",
            help="correct the profile as neod measures this host while serving (its CPU "
            "attention scale and fixed cost, and pipeline hand-off): the running neod's, else "
            "those the last one kept beside the profile",
        ),
        batch: int = typer.Option(
            0,
            min=0,
            help="also play this many requests, sent at once, through the scheduler on the "
            "profile's costs (the steady state leaves out a batch's start and tail); lengths "
            "within +-10% of the means, as neod.bench.throughput sends them",
        ),
        host_ms: float | None = typer.Option(
            None,
            min=0.0,
            help="with --batch: the engine's own time per iteration beyond the predicted forward "
            "(default: the running neod's median, else 0)",
        ),
        json_out: bool = typer.Option(False, "--json"),
    ) -> None:
        """Predict GPU-only and NEO throughput for a workload from this host's stored profile."""
        from neod.cache.pool import host_pool_blocks
        from neod.sched import (
            CalibratedCostModel,
            Limits,
            SplitRule,
            TableCostModel,
            predict_workload,
        )

        cfg = ctx.obj.config()
        profile, layout, path = _stored_profile(cfg)
        if profile is None:
            fail(
                f"no profile of this model on this host at {path}: run `neoctl profile` "
                "(or start neod "
                "once, which profiles a new host)"
            )
        gpu_bytes = int((gpu_kv_gib or cfg.cache.gpu_kv_gib) * GIB)
        if gpu_bytes <= 0:
            fail("give the GPU KV budget: --gpu-kv-gib (or set cache.gpu_kv_gib)")
        # The profile, the layout and the GPU budget are one rank's; the host pool is shared: each
        # of its blocks holds every rank's heads, and a rank's share of it is what it can use.
        tp = cfg.parallel.tp_size
        whole = replace(layout, num_kv_heads=layout.num_kv_heads * tp)
        cpu_bytes = int((cpu_kv_gib or cfg.cache.cpu_kv_gib) * GIB)
        if cpu_bytes <= 0:
            cpu_bytes = host_pool_blocks(whole, 0.0, pinned=False) * whole.block_bytes
        cpu_bytes //= tp
        limits = Limits(cfg.scheduler.max_batch_size, cfg.scheduler.max_tokens_in_batch, "auto")
        rule = SplitRule.of(cfg.scheduler)
        cost = TableCostModel(profile)
        corrections = None
        if as_measured:
            corrections = _measured_corrections(ctx.obj, profile, path)
            cost = CalibratedCostModel(
                cost,
                corrections["cpu_scale"],
                corrections["handoff_us"] * 1e-6,
                corrections["cpu_fixed_us"] * 1e-6,
            )
        result = predict_workload(
            cost,
            layout.num_layers,
            layout.bytes_per_token,
            gpu_bytes,
            cpu_bytes,
            input_len,
            output_len,
            limits,
            block_size=layout.block_size,
            split_rule=rule,
        )
        if corrections is not None:
            result["measured_corrections"] = corrections
        if batch:
            from neod.sched.simulate import batch_lengths

            result["batch"] = _simulated_batch(
                cost, layout, gpu_bytes, cpu_bytes, limits,
                batch_lengths(batch, input_len, output_len),
                _host_ms(ctx.obj) if host_ms is None else host_ms, rule,
            )  # fmt: skip
        # A profile from before the current form of the hand-off has it timed at neod's next
        # start; until then the prediction leaves it out.
        result["handoff_timed"] = corrections is not None or profile.pipeline_handoff is not None
        if json_out:
            echo_json(result)
        else:
            typer.echo(_render_prediction(result))
