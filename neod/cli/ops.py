"""neoctl's operations commands: status, tune, drain, resume, ping."""

from __future__ import annotations

import time
from typing import Any

import typer

from neod.cli.common import Ctl, echo_json, fail
from neod.cli.cpu_fit import cpu_fit_text
from neod.client import DaemonUnavailable, RequestError
from neod.cpu.topology import format_cpu_list
from neod.protocol import CPU_RETUNE_TIMEOUT_S

_SHOWN_ENGINE_KEYS = {"model", "device", "dtype", "policy", "mode", "max_batch_size",
                      "max_tokens_in_batch", "cpu_min_gain", "cpu_stretch", "cpu_round_robin",
                      "max_model_len",
                      "waiting", "decoding_gpu", "decoding_cpu", "kv_gpu", "kv_cpu", "cpu_pool",
                      "cpu_cost_scale", "pipeline_handoff"}


def _pct(p: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:g}" for k, v in p.items()) if p else "-"


def _kv(usage: dict[str, Any] | None) -> str:
    if not usage or not usage.get("blocks_total"):
        return "none"
    used, total = usage.get("blocks_used", 0), usage["blocks_total"]
    return f"{used}/{total} blocks ({100.0 * used / total:.1f}%)"


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m{s:02d}s" if hours else f"{m}m{s:02d}s"


def render_status(result: dict[str, Any]) -> str:
    srv, eng = result.get("server", {}), result.get("engine", {})
    lines = [f"neod {srv.get('version', '?')}  {srv.get('state', '?')}  pid {result.get('pid')}  "
             f"up {_duration(srv.get('uptime_s', 0))}  intake {srv.get('intake_endpoint')}"]
    if "error" in eng:
        lines.append(f"engine    ERROR: {eng['error']}")
    elif "model" in eng:
        lines += [
            f"model     {eng.get('model')} on {eng.get('device')} ({eng.get('dtype', '?')}), "
            f"context {eng.get('max_model_len')}",
            f"policy    {eng.get('policy')}  mode {_mode(eng)}"
            + f"  max_batch_size {eng.get('max_batch_size')}  max_tokens_in_batch "
              f"{eng.get('max_tokens_in_batch')}  cpu_min_gain {eng.get('cpu_min_gain')}  "
              f"cpu_stretch {eng.get('cpu_stretch')}  cpu_round_robin {eng.get('cpu_round_robin')}",
            f"requests  active {srv.get('active_requests')}  waiting {srv.get('waiting_requests')} "
            f"(engine queue {eng.get('waiting')}, held by neod {srv.get('held_by_neod')})  "
            f"decoding on GPU {eng.get('decoding_gpu')}, on CPU {eng.get('decoding_cpu')}",
            f"KV        GPU {_kv(eng.get('kv_gpu'))}   CPU {_kv(eng.get('kv_cpu'))}",
        ]
        pool = eng.get("cpu_pool") or {}
        bandwidth = pool.get("read_bandwidth_gbps")
        threads = pool.get("threads", 0)
        lines.append(f"CPU pool  {threads} thread{'' if threads == 1 else 's'}"
                     + (f" on CPUs {format_cpu_list(pool['cores'])}" if pool.get("cores") else "")
                     + (f" (the GPU's NUMA node {pool['numa_node']})"
                        if pool.get("numa_node") is not None else "")
                     + (f", {bandwidth:g} GB/s read bandwidth" if bandwidth else "")
                     + (f", {100 * pool['computing_share']:.0f}% of its thread time computing"
                        if pool.get("computing_share") is not None else "")
                     + (f", AMX {pool['amx']}" if pool.get("amx") else "")
                     + _waits(pool.get("waits"))
                     + _cpu_cost(eng.get("cpu_cost_scale"))
                     + _handoff(eng.get("pipeline_handoff")))
    else:
        lines.append(f"engine    {eng.get('state', 'not ready')}")
    lines += [
        f"rate      {srv.get('tokens_per_s', 0):g} tokens/s   producers {srv.get('producers')}",
        f"TTFT ms   {_pct(srv.get('ttft_ms', {}))}",
        f"TPOT ms   {_pct(srv.get('tpot_ms', {}))}",
        f"queue ms  {_pct(srv.get('queue_ms', {}))}",
        "counts    " + ("  ".join(f"{k}={v}" for k, v in srv.get("counts", {}).items()) or "-"),
    ]
    fit = (eng.get("iterations") or {}).get("cpu_fit")
    if fit:
        lines.append(f"CPU fit   {cpu_fit_text(fit)}")
    for key in sorted(set(eng) - _SHOWN_ENGINE_KEYS - {"error", "state"}):
        value = eng[key]
        if isinstance(value, dict):
            value = "  ".join(f"{k}={v}" for k, v in value.items()
                              if v is not None and k != "cpu_fit") or "-"
        lines.append(f"{key:<9} {value}")
    return "\n".join(lines)


def _cpu_cost(scale: dict[str, Any] | None) -> str:
    """The scheduler's correction of the profiled CPU attention cost, once it has measured."""
    if not scale or not scale.get("samples"):
        return ""
    fixed = scale.get("fixed_us") or 0.0
    return (f", its attention {scale['measured_over_profiled']:.2f}x the profiled cost"
            + (f" + {fixed:g} us per sub-batch layer" if fixed else "")
            + f" over {scale['samples']} iterations")


def _waits(waits: dict[str, Any] | None) -> str:
    """How long the pool's workers waited for their cores, and where the other threads run."""
    if not waits or waits.get("wait_share") is None:
        return ""
    others = waits.get("other_threads_on")
    return (f", workers waited {100 * waits['wait_share']:.2f}% of their time for a core"
            + (f" (other threads on CPUs {format_cpu_list(others)})" if others else ""))


def _handoff(handoff: dict[str, Any] | None) -> str:
    """The scheduler's hand-off: what a pipelined sub-batch's trip to the CPU and back adds per
    layer beyond its copies, as profiled, then as measured while serving."""
    if not handoff or not (handoff.get("samples") or handoff.get("profiled_us")):
        return ""
    source = (f"profiled {handoff.get('profiled_us', 0):g}, {handoff['samples']} iterations"
              if handoff.get("samples") else "as profiled")
    return f", pipeline hand-offs +{handoff['per_layer_us']:g} us ({source})"


def _mode(engine: dict[str, Any]) -> str:
    """The engine's current mode (sequential or pipelined), wherever its stats report it."""
    mode = engine.get("mode") or (engine.get("iterations") or {}).get("last_mode")
    return str(mode) if mode else "-"


def register(app: typer.Typer) -> None:
    @app.command()
    def status(ctx: typer.Context,
               json: bool = typer.Option(False, "--json", help="print the raw JSON")) -> None:
        """Model, devices, policy, queues, KV usage, CPU pool, throughput and latency."""
        result = ctx.obj.call("status")
        echo_json(result) if json else typer.echo(render_status(result))

    @app.command()
    def tune(ctx: typer.Context,
             policy: str | None = typer.Option(None, help="auto, gpu-only or neo"),
             max_batch_size: int | None = typer.Option(None, help="most requests per iteration"),
             max_tokens_in_batch: int | None = typer.Option(None, help="most tokens per iteration"),
             cpu_threads: int | None = typer.Option(
                 None, help="CPU attention threads (the pool is profiled again unless a profile "
                 "of that size is stored)"),
             cpu_min_gain: float | None = typer.Option(
                 None, help="least rise of an iteration's tokens/s for which a CPU decode beyond "
                 "what hides under the GPU work is taken (0.01 = 1%)"),
             cpu_stretch: float | None = typer.Option(
                 None, help="most CPU decodes may lengthen an iteration beyond its GPU work "
                 "(1.0 = to twice it): the GPU requests' time per token against throughput"),
             cpu_round_robin: int | None = typer.Option(
                 None, help="most requests the CPU holds per decode it keeps up with, when it "
                 "takes prompts while the GPU prefills (1 = no more than it decodes every "
                 "iteration): throughput and time to first token against the CPU requests' time "
                 "per token"),
             json: bool = typer.Option(False, "--json", help="print the raw JSON")) -> None:
        """Change scheduling knobs live; the daemon validates them and reports what it applied."""
        knobs = {k: v for k, v in (("policy", policy), ("max_batch_size", max_batch_size),
                                   ("max_tokens_in_batch", max_tokens_in_batch),
                                   ("cpu_threads", cpu_threads), ("cpu_min_gain", cpu_min_gain),
                                   ("cpu_stretch", cpu_stretch),
                                   ("cpu_round_robin", cpu_round_robin)) if v is not None}
        if not knobs:
            fail("give at least one of --policy, --max-batch-size, --max-tokens-in-batch, "
                 "--cpu-threads, --cpu-min-gain, --cpu-stretch, --cpu-round-robin", 2)
        wait = {"timeout_s": CPU_RETUNE_TIMEOUT_S + 10} if cpu_threads is not None else {}
        result = ctx.obj.call("tune", **wait, **knobs)
        if json:
            echo_json(result)
        else:
            typer.echo("applied: " + "  ".join(f"{k}={v}" for k, v in result["applied"].items()))

    @app.command()
    def drain(ctx: typer.Context,
              exit_: bool = typer.Option(False, "--exit", help="shut the daemon down afterwards "
                                         "(in-flight requests get the grace period)"),
              wait: bool = typer.Option(False, "--wait", help="return once nothing is in flight"),
              json: bool = typer.Option(False, "--json", help="print the raw JSON")) -> None:
        """Stop accepting requests and let in-flight ones finish (`neoctl resume` undoes it)."""
        obj: Ctl = ctx.obj
        result = obj.call("drain", exit=exit_)
        echo_json(result) if json else typer.echo(
            f"draining: {result['active_requests']} request(s) in flight"
            + (f"; the daemon exits once they finish (at most {result['grace_period_s']:g}s)"
               if exit_ else ""))
        if wait:
            _wait_idle(obj, exit_)

    @app.command()
    def resume(ctx: typer.Context,
               json: bool = typer.Option(False, "--json", help="print the raw JSON")) -> None:
        """Accept requests again after `neoctl drain` (not after `drain --exit`)."""
        result = ctx.obj.call("resume")
        echo_json(result) if json else typer.echo(f"state: {result['state']}")

    @app.command()
    def ping(ctx: typer.Context,
             json: bool = typer.Option(False, "--json", help="print the raw JSON")) -> None:
        """Check that the daemon answers on its control endpoint."""
        start = time.monotonic()
        result = ctx.obj.call("ping")
        result["rtt_ms"] = round((time.monotonic() - start) * 1000, 2)
        echo_json(result) if json else typer.echo(
            f"neod {result['version']} pid {result['pid']} {result['state']}, "
            f"{result['rtt_ms']:g} ms")


def _wait_idle(obj: Ctl, exiting: bool) -> None:
    """Poll until nothing is in flight (or, when exiting, until the daemon is gone)."""
    with obj.control_client() as client:
        while True:
            try:
                srv = client.call("status", timeout_s=obj.timeout_s)["server"]
            except (DaemonUnavailable, RequestError):
                if exiting:
                    typer.echo("neod has exited")
                    return
                raise
            if srv["active_requests"] == 0 and not exiting:
                typer.echo("drained: nothing in flight")
                return
            time.sleep(0.5)
