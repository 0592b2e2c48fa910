"""Benchmark of the daemon path: added latency over the engine's own TTFT, and intake rate.

    python -m neod.bench.daemon [--requests 300] [--burst 20000] [--producers 4]

1. Engine TTFT: the engine alone, one request at a time (add_request, step until its first token),
   run on the daemon's engine thread while the daemon is idle (the thread that built the engine:
   on CPU hosts torch is much slower on any other thread).
2. Daemon TTFT: the same requests through the daemon (ZeroMQ in, validation, tokenization, the
   engine thread, detokenization, ZeroMQ out), measured by a client from send to first delta, with
   the same engine. The difference of the two p50s is the daemon's added latency.
3. Intake: producer processes send a burst of small requests as fast as they can; the report gives
   how fast the daemon acknowledged them (accepted or refused) and the longest pause between two
   engine iterations meanwhile (intake must never stall the engine).
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import orjson
import zmq

from neod.client import Client
from neod.config import load_config
from neod.engine.request import SamplingParams
from neod.server.embedded import EmbeddedDaemon
from neod.server.runner import EngineLike
from neod.tokenizer import Tokenizer, load_tokenizer


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 3)


def prompts(n: int, chars: int) -> list[str]:
    return [f"{i:06d} " + "the quick brown fox jumps over the lazy dog "[:chars] for i in range(n)]


def engine_ttft_ms(engine: EngineLike, tokenizer: Tokenizer, texts: list[str]) -> list[float]:
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    samples = []
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)
        rid = f"engine-{i}"
        start = time.perf_counter()
        engine.add_request(rid, ids, params)
        while not any(o.request_id == rid and o.new_token_ids for o in engine.step()):
            pass
        samples.append((time.perf_counter() - start) * 1000)
        while engine.has_unfinished():
            engine.step()
    return samples


def daemon_ttft_ms(intake: str, texts: list[str]) -> list[float]:
    samples = []
    with Client(intake, timeout_s=60) as client:
        for text in texts:
            start = time.perf_counter()
            stream = client.stream(text, max_tokens=1, temperature=0.0, ignore_eos=True)
            for delta in stream:
                if delta.token_ids:
                    samples.append((time.perf_counter() - start) * 1000)
    return samples


class StepClock:
    """Wraps the engine to record when each iteration starts and ends."""

    def __init__(self, engine: EngineLike) -> None:
        self._engine = engine
        self.spans: list[tuple[float, float]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def step(self) -> list:
        start = time.perf_counter()
        outputs = self._engine.step()
        self.spans.append((start, time.perf_counter()))
        return outputs


def producer(endpoint: str, count: int, tag: int, result: Any) -> None:
    """Send `count` small requests back to back; report when each was acknowledged."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(endpoint)
    frames = [orjson.dumps({"v": 1, "type": "generate", "id": f"{tag}-{i}", "prompt": f"burst {i}",
                            "max_tokens": 1, "ignore_eos": True}) for i in range(count)]
    acked = ended = 0
    start = time.perf_counter()
    for frame in frames:
        sock.send(frame)
    while ended < count:
        event = orjson.loads(sock.recv())
        if event["type"] in ("accepted", "error"):
            acked += 1
            if acked == count:
                ack_s = time.perf_counter() - start
        if event["type"] in ("final", "error"):
            ended += 1
    result.put((start, ack_s, time.perf_counter() - start))
    sock.close(0)
    ctx.term()


def intake_burst(intake: str, total: int, num_producers: int) -> dict[str, float]:
    mp = multiprocessing.get_context("spawn")
    results = mp.Queue()
    procs = [mp.Process(target=producer, args=(intake, total // num_producers, k, results))
             for k in range(num_producers)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    first = min(start for start, _, _ in outcomes)
    acked = max(start + ack for start, ack, _ in outcomes) - first
    done = max(start + end for start, _, end in outcomes) - first
    sent = total // num_producers * num_producers
    return {"requests": sent, "acked_per_s": round(sent / acked),
            "served_per_s": round(sent / done), "window": (first, first + done)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="sequential TTFT samples")
    parser.add_argument("--prompt-chars", type=int, default=32)
    parser.add_argument("--burst", type=int, default=20000, help="requests in the intake burst")
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], help="config override")
    args = parser.parse_args(argv)

    from neod.engine import Engine

    with tempfile.TemporaryDirectory(prefix="neod-bench-") as tmp:
        cfg = load_config(None, env={}, overrides=[
            "model.device=cpu", "cache.cpu_kv_gib=0.5",
            f"server.intake_endpoint=ipc://{tmp}/intake.sock",
            f"server.control_endpoint=ipc://{tmp}/control.sock",
            "server.max_queued_requests=1000000", "server.max_inflight_per_client=1000000",
            *args.set])
        clocks: list[StepClock] = []

        def build(cfg_: Any) -> StepClock:
            clocks.append(StepClock(Engine(cfg_)))
            return clocks[0]

        tokenizer = load_tokenizer(cfg.model)
        texts = prompts(args.requests, args.prompt_chars)
        with EmbeddedDaemon(cfg, build) as daemon:
            runner = daemon.server.runner
            assert runner is not None
            runner.call(lambda e: engine_ttft_ms(e, tokenizer, texts[:20])).result()  # warm-up
            engine_ms = runner.call(lambda e: engine_ttft_ms(e, tokenizer, texts)).result()
            engine = clocks[0]
            daemon_ttft_ms(daemon.intake_endpoint, texts[:20])
            daemon_ms = daemon_ttft_ms(daemon.intake_endpoint, texts)
            engine.spans.clear()
            burst = intake_burst(daemon.intake_endpoint, args.burst, args.producers)
        lo, hi = burst.pop("window")
        spans = [(a, b) for a, b in engine.spans if lo <= a <= hi]
        steps_ms = [(b - a) * 1000 for a, b in spans]
        # Time the engine thread spent between two steps: handing outputs over, taking new work,
        # and waiting for the GIL while the loop thread ingests the burst.
        between_ms = [(nxt[0] - prev[1]) * 1000 for prev, nxt in zip(spans, spans[1:],
                                                                       strict=False)]
    report = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                   f"{multiprocessing.cpu_count()} cores, Python {platform.python_version()}",
        "device": str(cfg.model.device), "preset": cfg.model.preset,
        "engine_ttft_ms": {"p50": pct(engine_ms, 50), "p90": pct(engine_ms, 90),
                           "p99": pct(engine_ms, 99)},
        "daemon_ttft_ms": {"p50": pct(daemon_ms, 50), "p90": pct(daemon_ms, 90),
                           "p99": pct(daemon_ms, 99)},
        "added_ms_p50": round(statistics.median(daemon_ms) - statistics.median(engine_ms), 3),
        "intake": burst,
        "engine_iterations_during_burst": len(spans),
        "engine_step_ms": {"p50": pct(steps_ms, 50), "max": round(max(steps_ms), 3)},
        "engine_between_steps_ms": {"p50": pct(between_ms, 50), "p99": pct(between_ms, 99),
                                    "max": round(max(between_ms), 3)},
    }
    sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
