"""The engine with tensor parallelism on the CPU (gloo): rank 0 in this process, rank 1 spawned.

Greedy outputs with tp_size=2 must equal tp_size=1 (policy gpu-only, and policy neo with swaps,
CPU prefills and pipelined CPU decodes forced by the scripted scheduler); a follower that is
killed, crashes or dies while starting makes rank 0 raise, naming it, within seconds; close()
leaves no process behind. Limits are small so that each engine's profile takes under a second;
profiles are shared by the whole module.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from test_engine import (
    ScriptedScheduler,
    assert_all_free,
    assert_greedy_equal,
    prompts,
    recording_plans,
    run_all,
    tokens_of,
)

from neod.client import Client, ControlClient, DaemonUnavailable
from neod.config import load_config
from neod.dist.launch import RankExited
from neod.dist.messages import Step, Swap, send
from neod.engine import Engine
from neod.engine.request import FinishReason, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
FAIL_FAST_S = 5.0


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("profiles")


@pytest.fixture
def engines(profile_dir):
    """make(tp_size, **overrides) -> Engine; every engine is closed after the test."""
    made: list[Engine] = []

    def make(tp_size: int, **overrides) -> Engine:
        base = {
            "model.device": "cpu",
            "model.preset": "tiny",
            "model.max_model_len": 128,
            "scheduler.max_batch_size": 16,
            "scheduler.max_tokens_in_batch": 256,
            "cpu.threads": 2,
            "profile.dir": str(profile_dir),
            "parallel.tp_size": tp_size,
        }
        base.update(overrides)
        engine = Engine(load_config(None, env={}, overrides=base))
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()
    assert_no_children()


def assert_no_children() -> None:
    assert multiprocessing.active_children() == []
    children = psutil.Process().children(recursive=True)
    assert [p for p in children if "spawn_main" in " ".join(p.cmdline())] == []


def follower_pid(engine: Engine) -> int:
    (proc,) = engine.rt.tp.procs
    return proc.pid


def greedy_tokens(engine: Engine, ps: list[list[int]], params: SamplingParams) -> dict:
    for i, p in enumerate(ps):
        engine.add_request(f"r{i}", p, params)
    return {k: tokens_of(v) for k, v in run_all(engine).items()}


def test_gpu_only_fp32_tp2_equals_tp1(engines, profile_dir):
    ps = prompts(6, seed=2)
    fp32 = {"scheduler.policy": "gpu-only", "model.dtype": "float32"}
    expected = greedy_tokens(engines(1, **fp32), ps, GREEDY)
    engine = engines(2, **fp32)
    assert engine.stats()["tp_size"] == 2
    assert engine.rt.model.config.num_key_value_heads == 1  # this rank's half of the KV heads
    assert greedy_tokens(engine, ps, GREEDY) == expected
    assert_all_free(engine)
    tps = {json.loads(f.read_text())["key"]["tp"] for f in profile_dir.glob("*.json")}
    assert {1, 2} <= tps, "the tp_size=2 engine must store its profile under its own key"


def test_chunked_prefills_tp2_equal_whole_prefills_tp1(engines):
    """A token budget of 16 puts most prompts in chunks: the followers build each chunk's prefix
    context from the rows they receive."""
    ps = prompts(6, seed=7)
    assert max(map(len, ps)) > 2 * 16
    fp32 = {"scheduler.policy": "gpu-only", "model.dtype": "float32"}
    reference = engines(1, **fp32)
    expected = greedy_tokens(reference, ps, GREEDY)
    got = greedy_tokens(engines(2, **fp32, **{"scheduler.max_tokens_in_batch": 16}), ps, GREEDY)
    assert_greedy_equal(reference, {f"r{i}": p for i, p in enumerate(ps)}, expected, got)


def test_neo_swaps_and_cpu_decodes_tp2_equal_tp1(engines):
    """fp16 (the CPU kernel's KV dtype). The scripted scheduler forces every data path: CPU
    prefills, swaps both ways, CPU decodes in both sub-batches of pipelined steps."""
    ps = prompts(8, seed=5)
    neo = {"scheduler.policy": "neo", "cache.cpu_kv_gib": 0.01, "model.dtype": "float16"}
    reference = engines(1, **{"scheduler.policy": "gpu-only", "model.dtype": "float16"})
    expected = greedy_tokens(reference, ps, GREEDY)
    engine = engines(2, **neo)
    assert engine.rt.cpu_threads == 1  # the pool's two cores, one per rank
    assert engine.rt.num_cpu_blocks > 0
    with pytest.raises(ValueError, match="fixed at start under tensor parallelism"):
        engine.tune(cpu_threads=2)  # rank 0 alone cannot resize every rank's pool
    engine.rt.scheduler = ScriptedScheduler()
    got = greedy_tokens(engine, ps, GREEDY)
    assert engine.stats()["iterations"]["pipelined"] > 0
    assert_greedy_equal(reference, {f"r{i}": p for i, p in enumerate(ps)}, expected, got)
    assert_all_free(engine)


def test_prompts_only_the_host_pool_holds_tp2_equal_whole_prefills_tp1(engines):
    """Prompts longer than the GPU pool and the token budget go to the host pool in chunks: each
    rank reads its own heads' earlier KV from its own host pool for every chunk."""
    rng = random.Random(9)
    ps = [[rng.randrange(256) for _ in range(n)] for n in (70, 45, 90)]
    reference = engines(1, **{"scheduler.policy": "gpu-only", "model.dtype": "float16"})
    expected = greedy_tokens(reference, ps, GREEDY)
    engine = engines(2, **{"scheduler.policy": "neo", "model.dtype": "float16",
                           "cache.cpu_kv_gib": 0.01, "cache.gpu_kv_gib": 2 * 16 * 1024 / 2**30,
                           "scheduler.max_tokens_in_batch": 16})  # fmt: skip
    assert engine.stats()["kv_gpu"]["blocks_total"] * 16 < min(map(len, ps))
    plans = recording_plans(engine)
    got = greedy_tokens(engine, ps, GREEDY)
    assert any(sid in plan.prefill_cpu for plan in plans for sid in plan.chunked)
    assert_greedy_equal(reference, {f"r{i}": p for i, p in enumerate(ps)}, expected, got)
    assert_all_free(engine)


def test_killed_follower_fails_the_next_step_fast(engines):
    engine = engines(2, **{"scheduler.policy": "gpu-only"})
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=50, temperature=0.0))
    engine.step()
    os.kill(follower_pid(engine), signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RankExited, match=r"rank 1 \(pid \d+\) exited with code -9 \(SIGKILL\)"):
        engine.step()
    assert time.monotonic() - start < FAIL_FAST_S
    with pytest.raises(RankExited):  # and every step after it
        engine.step()
    assert engine.fail_all("rank lost")[-1].finish_reason == FinishReason.ERROR
    engine.close()
    assert_no_children()


def test_follower_crash_inside_a_step_is_named_with_its_exit_code(engines):
    engine = engines(2, **{"scheduler.policy": "gpu-only"})
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=50, temperature=0.0))
    engine.step()
    # A swap of a block that does not exist: the follower raises and exits with status 1 while
    # rank 0 goes on into the step's collectives.
    send(Step([Swap(True, [[10**9, 0]])], []), engine.rt.tp.group.messages)
    start = time.monotonic()
    with pytest.raises(RankExited, match=r"rank 1 \(pid \d+\) exited with code 1"):
        engine.step()
    assert time.monotonic() - start < FAIL_FAST_S


def test_follower_dying_at_start_fails_construction(engines):
    """Kill rank 1 while rank 0 builds its engine: the constructor raises, naming it."""
    error: list[BaseException] = []

    def build() -> None:
        try:
            engines(2, **{"scheduler.policy": "gpu-only"})
        except BaseException as exc:
            error.append(exc)

    builder = threading.Thread(target=build)
    start = time.monotonic()
    builder.start()
    while not multiprocessing.active_children() and builder.is_alive():
        time.sleep(0.01)
    for p in multiprocessing.active_children():
        p.kill()
    builder.join(60)
    assert not builder.is_alive()
    assert len(error) == 1 and isinstance(error[0], RankExited), error
    assert "rank 1" in str(error[0]) and "SIGKILL" in str(error[0])
    assert time.monotonic() - start < 30
    assert_no_children()


def test_close_stops_the_followers(engines):
    engine = engines(2, **{"scheduler.policy": "gpu-only"})
    pid = follower_pid(engine)
    assert psutil.pid_exists(pid)
    engine.close()
    assert engine.rt.tp.procs[0].exitcode == 0  # it left on the stop message, not killed
    assert not psutil.pid_exists(pid)
    assert_no_children()


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"parallel.tp_size": 3}, ValueError, "num_attention_heads=4 is not divisible by "
                                              "world_size=3"),
        ({"scheduler.policy": "neo", "model.dtype": "float16", "cpu.threads": 1}, ValueError,
         "fewer than the 2 tensor-parallel ranks"),
    ],
)
def test_bad_setups_fail_and_leave_no_process(engines, overrides, error, match):
    with pytest.raises(error, match=match):
        engines(overrides.pop("parallel.tp_size", 2), **overrides)
    assert_no_children()


def test_tp_size_setting():
    assert load_config(None, env={}).parallel.tp_size == 1
    assert load_config(None, env={"NEOD_PARALLEL_TP_SIZE": "2"}).parallel.tp_size == 2
    cfg = load_config(None, env={"NEOD_PARALLEL_TP_SIZE": "2"}, overrides=["parallel.tp_size=4"])
    assert cfg.parallel.tp_size == 4
    with pytest.raises(ValueError, match=r"\[parallel\] tp_size: 0 is not allowed"):
        load_config(None, env={}, overrides=["parallel.tp_size=0"])


def test_daemon_with_tp_size_2_serves_and_stops_its_followers(tmp_path):
    """`python -m neod` with tp_size=2: it serves; Ctrl-C (SIGINT to its process group) reaches
    rank 0 alone, which drains and stops rank 1 with a message rather than a kill."""
    config = tmp_path / "neod.toml"
    config.write_text(
        '[model]\ndevice = "cpu"\nmax_model_len = 128\n'
        "[scheduler]\nmax_batch_size = 8\nmax_tokens_in_batch = 256\n"
        "[cache]\ncpu_kv_gib = 0.05\n[cpu]\nthreads = 2\n[parallel]\ntp_size = 2\n"
        f'[profile]\ndir = "{tmp_path}/profiles"\n'
        f'[server]\nintake_endpoint = "ipc://{tmp_path}/intake.sock"\n'
        f'control_endpoint = "ipc://{tmp_path}/control.sock"\n'
    )
    log = (tmp_path / "neod.log").open("a")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "neod", "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "neod.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "neod.log").read_text()
            try:
                with Client(f"ipc://{tmp_path}/intake.sock", timeout_s=30,
                            connect_timeout_s=0.5) as c:
                    reply = c.generate("Hello", max_tokens=8, temperature=0, ignore_eos=True)
                    break
            except DaemonUnavailable:
                time.sleep(0.2)
        assert reply.final.usage.completion_tokens == 8
        with ControlClient(f"ipc://{tmp_path}/control.sock") as control:
            assert control.call("status")["engine"]["tp_size"] == 2
        children = psutil.Process(proc.pid).children()
        (follower,) = [p for p in children if "spawn_main" in " ".join(p.cmdline())]
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0
        assert not psutil.pid_exists(follower.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = (tmp_path / "neod.log").read_text()
    assert "tensor-parallel rank 1 of 2 joined" in text
    assert "killing tensor-parallel rank" not in text
