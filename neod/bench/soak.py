"""Soak test: thousands of requests with random cancellations, deadlines and abandoned streams.

    python -m neod.bench.soak --requests 5000 --concurrency 64 [--tune-every 0.5]

Checks, and exits non-zero if any fails: every request ends in exactly one `final` or `error`,
with only the error codes the workload can cause; nothing is left in flight; every KV block is
free again; the daemon's memory stays bounded: the number of live Python objects does not grow
over the second half of the run (RSS is reported too, but it also grows while the KV pools'
pages are touched for the first time, which is not a leak).
Without `--intake` it starts an embedded daemon (tiny model on the CPU unless configured
otherwise); with `--intake/--control` it soaks a running daemon. `--tune-every S` also retunes the
daemon every S seconds while it serves (policy, batch limits, now and then the CPU pool's size, all
at random); every tune must be applied, and the checks above must hold regardless. The daemon is
left with the knobs it started with. With `--drain` it also drains the daemon now and then for a
moment and resumes it (requests sent meanwhile are refused with shutting_down).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import random
import sys
import tempfile
import time
from typing import Any

import orjson
import psutil

from neod.client import (
    AsyncClient,
    ControlClient,
    DaemonUnavailable,
    RequestError,
    RequestTimeout,
)
from neod.config import load_config
from neod.protocol import CPU_RETUNE_TIMEOUT_S

ALLOWED_ERRORS = {"deadline_exceeded", "overloaded", "prompt_too_long"}
# Retunes of the CPU pool's size among all retunes (each measures the pool again: seconds).
CPU_RESIZE_SHARE = 0.1
# Of the retuner's turns with --drain, the share that drains the daemon for a moment instead.
DRAIN_SHARE = 0.1


async def abandoned_request(intake: str, rng: random.Random, outcomes: collections.Counter,
                            problems: list[str], allowed: set[str]) -> None:
    """A producer that vanishes mid-stream, without cancelling: the daemon must clean up."""
    client = AsyncClient(intake, timeout_s=120)
    try:
        stream = await client.stream("abandon " * rng.randint(1, 20), max_tokens=64,
                                     ignore_eos=True)
        async for _ in stream:
            break
    except RequestError as exc:  # refused at once (a retune may have narrowed the limits)
        outcomes[f"error_{exc.code}"] += 1
        if exc.code not in allowed:
            problems.append(f"unexpected error {exc.code}: {exc.message}")
        return
    finally:
        await client.close()
    outcomes["abandoned"] += 1


async def one_request(client: AsyncClient, rng: random.Random, outcomes: collections.Counter,
                      problems: list[str], allowed: set[str]) -> None:
    """One random request: streamed or not, maybe cancelled, maybe with a short deadline."""
    prompt = "".join(rng.choice("abcdefgh éü日本 \n") for _ in range(rng.randint(1, 200)))
    params: dict[str, Any] = {"max_tokens": rng.randint(1, 64), "temperature": rng.random(),
                              "ignore_eos": rng.random() < 0.5, "seed": rng.randint(0, 1000)}
    if rng.random() < 0.1:
        params["deadline_s"] = rng.uniform(0.01, 0.5)
    if rng.random() < 0.1:
        params["stop"] = [rng.choice("abcdefgh")]
    cancel_after = rng.randint(0, 8) if rng.random() < 0.25 else None
    try:
        if cancel_after is None and rng.random() < 0.5:
            result = await client.generate(prompt, **params)
            outcomes[f"final_{result.finish_reason}"] += 1
            return
        stream = await client.stream(prompt, **params)
        received = 0
        async for delta in stream:
            received += len(delta.token_ids)
            if cancel_after is not None and received >= cancel_after:
                await stream.cancel()
                cancel_after = None
        if stream.final is None:
            outcomes["no_final"] += 1
            problems.append(f"{stream.id}: the stream ended without a final event")
            return
        outcomes[f"final_{stream.final.finish_reason}"] += 1
        if stream.final.usage.completion_tokens != received:
            problems.append(f"{stream.id}: usage {stream.final.usage.completion_tokens} != "
                            f"{received} tokens streamed")
    except RequestError as exc:
        outcomes[f"error_{exc.code}"] += 1
        if exc.code not in allowed:
            problems.append(f"unexpected error {exc.code}: {exc.message}")
    except RequestTimeout:
        outcomes["timeout"] += 1
        problems.append("a request got no answer within the client timeout")


async def soak(intake: str, num_requests: int, concurrency: int, seed: int, memory: Any,
               control: str | None = None, tune_every_s: float = 0.0, drain: bool = False,
               ) -> tuple[collections.Counter, list[str], list[tuple[int, int]], dict[str, int]]:
    outcomes: collections.Counter = collections.Counter()
    tunes: collections.Counter = collections.Counter()
    problems: list[str] = []
    samples: list[tuple[int, int]] = []
    rng = random.Random(seed)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(num_requests):
        queue.put_nowait(i)
    allowed = ALLOWED_ERRORS | ({"shutting_down"} if drain else set())

    async def worker(k: int) -> None:
        async with AsyncClient(intake, timeout_s=120) as client:
            while not queue.empty():
                i = queue.get_nowait()
                request_rng = random.Random(rng.random() + k)
                if request_rng.random() < 0.03:
                    await abandoned_request(intake, request_rng, outcomes, problems, allowed)
                else:
                    await one_request(client, request_rng, outcomes, problems, allowed)
                if i % 100 == 0:
                    samples.append(memory())

    done = asyncio.Event()
    tuning = None
    if control is not None and tune_every_s > 0:
        tuning = asyncio.create_task(
            retune(control, tune_every_s, random.Random(seed + 1), done, tunes, problems, drain))
    try:
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    finally:
        done.set()
        if tuning is not None:
            await tuning
    return outcomes, problems, samples, dict(tunes)


def random_knobs(rng: random.Random, start: dict[str, Any]) -> dict[str, Any]:
    """Random values within what the daemon started with (its staging buffers' sizes)."""
    knobs: dict[str, Any] = {
        "policy": rng.choice(["auto", "neo", "gpu-only"]),
        "max_batch_size": rng.choice([1, 2, 8]) if rng.random() < 0.5 else start["max_batch_size"],
        # Below some prompts' lengths: those are then prefilled in chunks.
        "max_tokens_in_batch": (
            rng.choice([64, 256]) if rng.random() < 0.2 else start["max_tokens_in_batch"]
        ),
    }
    if rng.random() < 0.3:  # from hiding-only to past any balance
        knobs["cpu_min_gain"] = rng.choice([0.0, 0.01, 1.0])
        knobs["cpu_stretch"] = rng.choice([0.0, 0.1, 1.0, 10.0])
        knobs["cpu_round_robin"] = rng.choice([1, 3, 64])
    if start.get("cpu_threads") and rng.random() < CPU_RESIZE_SHARE:
        knobs["cpu_threads"] = rng.randint(1, start["cpu_threads"])
    return knobs


async def retune(control: str, every_s: float, rng: random.Random, done: asyncio.Event,
                 tunes: collections.Counter, problems: list[str], drain: bool = False) -> None:
    """Retunes the daemon at random until `done`, then restores its knobs; every tune must be
    applied as asked. With `drain`, some turns drain the daemon for a moment instead. A lost
    control endpoint ends the retuning as a problem of the run."""
    try:
        await _retune(control, every_s, rng, done, tunes, problems, drain)
    except DaemonUnavailable as exc:
        problems.append(f"retuning stopped: {exc}")


async def _retune(control: str, every_s: float, rng: random.Random, done: asyncio.Event,
                  tunes: collections.Counter, problems: list[str], drain: bool) -> None:
    with ControlClient(control) as ctl:
        engine = (await asyncio.to_thread(ctl.call, "status"))["engine"]
        start = {key: engine[key] for key in ("policy", "max_batch_size", "max_tokens_in_batch",
                                              "cpu_min_gain", "cpu_stretch",
                                              "cpu_round_robin")}
        if engine.get("cpu_pool", {}).get("threads"):
            start["cpu_threads"] = engine["cpu_pool"]["threads"]
        last = False
        while not last:
            try:
                await asyncio.wait_for(done.wait(), every_s)
                knobs, last = start, True
            except TimeoutError:
                if drain and rng.random() < DRAIN_SHARE:
                    try:
                        await asyncio.to_thread(ctl.call, "drain", exit=False)
                        await asyncio.sleep(rng.uniform(0.05, 0.3))
                        await asyncio.to_thread(ctl.call, "resume")
                    except RequestError as exc:
                        problems.append(f"drain or resume refused: {exc}")
                    tunes["drains"] += 1
                    continue
                knobs = random_knobs(rng, start)
            try:
                applied = (await asyncio.to_thread(
                    ctl.call, "tune", timeout_s=CPU_RETUNE_TIMEOUT_S + 10, **knobs))["applied"]
            except RequestError as exc:
                problems.append(f"tune {knobs} refused: {exc}")
                continue
            if any(applied.get(k) != v for k, v in knobs.items()):
                problems.append(f"tune {knobs} applied {applied}")
            tunes["tunes"] += 1
            tunes["cpu_resizes"] += "cpu_threads" in knobs


def _own_memory() -> tuple[int, int]:
    """(RSS bytes, live Python objects) of this process, which hosts the embedded daemon."""
    gc.collect()
    return psutil.Process().memory_info().rss, len(gc.get_objects())


def _unknown_memory() -> tuple[int, int]:
    return 0, 0


def wait_idle(control: str, timeout_s: float = 30.0) -> dict[str, Any]:
    with ControlClient(control) as ctl:
        deadline = time.monotonic() + timeout_s
        while True:
            status = ctl.call("status")
            if status["server"]["active_requests"] == 0 or time.monotonic() > deadline:
                return status
            time.sleep(0.1)


def _leftovers(status: dict[str, Any]) -> list[str]:
    """What an idle daemon should no longer hold: requests in flight, KV blocks in use."""
    found = []
    if status["server"]["active_requests"]:
        found.append(f"{status['server']['active_requests']} requests still in flight")
    for pool in ("kv_gpu", "kv_cpu"):
        used = status["engine"].get(pool, {}).get("blocks_used", 0)
        if used:
            found.append(f"{used} {pool} blocks leaked")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--intake", help="soak a running daemon at this endpoint")
    parser.add_argument("--control", help="its control endpoint (required with --intake)")
    parser.add_argument("--set", action="append", default=[], help="config override for the "
                        "embedded daemon, section.key=value")
    parser.add_argument("--max-object-growth", type=float, default=0.01,
                        help="allowed growth of live Python objects over the second half")
    parser.add_argument("--tune-every", type=float, default=0.0, metavar="SECONDS",
                        help="retune the daemon at random this often while it serves (0: never)")
    parser.add_argument("--drain", action="store_true",
                        help="with --tune-every: now and then drain the daemon for a moment")
    args = parser.parse_args(argv)

    daemon = None
    tmp = tempfile.TemporaryDirectory(prefix="neod-soak-")
    if args.intake:
        if not args.control:
            parser.error("--control is required with --intake")
        intake, control = args.intake, args.control
        memory = _unknown_memory  # another process: its memory is not ours to read
    else:
        from neod.server.embedded import EmbeddedDaemon

        cfg = load_config(None, env={}, overrides=[
            "model.device=cpu", "cache.cpu_kv_gib=0.5",
            f"server.intake_endpoint=ipc://{tmp.name}/intake.sock",
            f"server.control_endpoint=ipc://{tmp.name}/control.sock", *args.set])
        daemon = EmbeddedDaemon(cfg).start()
        intake, control = daemon.intake_endpoint, daemon.control_endpoint
        memory = _own_memory

    start = time.monotonic()
    try:
        outcomes, problems, samples, tunes = asyncio.run(
            soak(intake, args.requests, args.concurrency, args.seed, memory, control,
                 args.tune_every, args.drain))
        try:
            status = wait_idle(control)
        except DaemonUnavailable as exc:
            problems.append(f"no final status: {exc}")
            status = None
    finally:
        if daemon is not None:
            daemon.stop()
        tmp.cleanup()
    elapsed = time.monotonic() - start
    total = sum(outcomes.values())
    if total != args.requests:
        problems.append(f"{total} outcomes for {args.requests} requests")
    if status is not None:
        problems.extend(_leftovers(status))
    half = samples[len(samples) // 2:]
    growth_mib = (half[-1][0] - half[0][0]) / 2**20 if half else 0.0
    objects = (half[-1][1] - half[0][1]) / max(1, half[0][1]) if half else 0.0
    if objects > args.max_object_growth:
        problems.append(f"live Python objects grew {objects:.1%} over the second half of the run "
                        f"({half[0][1]} -> {half[-1][1]})")
    report = {"requests": args.requests, "elapsed_s": round(elapsed, 1),
              "requests_per_s": round(args.requests / elapsed, 1), "outcomes": dict(outcomes),
              "tunes": tunes,
              "rss_growth_second_half_mib": round(growth_mib, 1),
              "python_object_growth_second_half": round(objects, 4), "problems": problems[:20]}
    sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
