"""Engine behaviour on the tiny model, on CPU: batching, stop conditions, errors, block accounting,
and NEO mode against GPU-only mode (identical greedy tokens)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from types import SimpleNamespace

import orjson
import pytest
import torch

from neod.cache.pool import KVLayout, allocate_pool
from neod.config import load_config
from neod.engine import Engine, corrections
from neod.engine.request import EngineError, FinishReason, RequestOutput, SamplingParams
from neod.engine.runtime import build_runtime
from neod.model.attention import AttentionMetadata
from neod.sched import Residence, SplitRule

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def make_engine(tmp_path, **overrides) -> Engine:
    base = {
        "model.device": "cpu",
        "model.preset": "tiny",
        "scheduler.max_batch_size": 16,
        "scheduler.max_tokens_in_batch": 1024,
        "cpu.threads": 2,
        "profile.dir": str(tmp_path / "profiles"),
    }
    base.update(overrides)
    return Engine(load_config(None, env={}, overrides=base))


def run_all(
    engine: Engine,
    max_steps: int = 2000,
    after_step: Callable[[Engine], None] | None = None,
) -> dict[str, list[RequestOutput]]:
    """Step until every request has ended; `after_step` sees the engine after each step."""
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        if after_step is not None:
            after_step(engine)
        if not engine.has_unfinished():
            return outputs
    raise AssertionError("requests did not finish")


def tokens_of(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def assert_all_free(engine: Engine) -> None:
    assert engine.gpu_blocks.num_free == engine.gpu_blocks.num_blocks
    assert engine.cpu_blocks.num_free == engine.cpu_blocks.num_blocks


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randrange(1, 60))] for _ in range(n)]


def reference_greedy(engine: Engine, prompt: list[int], max_tokens: int) -> list[int]:
    """One request alone through model.forward over a private pool: what batching must not
    change."""
    model = engine.rt.model
    cfg = model.config
    layout = KVLayout(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 16, model.dtype)
    pool = allocate_pool(layout, 64, torch.device("cpu"))
    blocks = list(range(63, -1, -1))  # reversed ids: a non-trivial block table
    tokens = list(prompt)
    for step in range(max_tokens):
        n = len(tokens)
        if step == 0:
            ids, pos = torch.tensor(tokens), torch.arange(n)
            slots = torch.tensor([blocks[t // 16] * 16 + t % 16 for t in range(n)])
            meta = AttentionMetadata(
                n,
                torch.tensor([0, n], dtype=torch.int32),
                n,
                slots,
                torch.zeros((0, 1), dtype=torch.int32),
                torch.zeros(0, dtype=torch.int32),
            )
        else:
            ids, pos = torch.tensor(tokens[-1:]), torch.tensor([n - 1])
            slots = torch.tensor([blocks[(n - 1) // 16] * 16 + (n - 1) % 16])
            table = torch.tensor([blocks[: -(-n // 16)]], dtype=torch.int32)
            meta = AttentionMetadata(
                0,
                torch.zeros(1, dtype=torch.int32),
                0,
                slots,
                table,
                torch.tensor([n], dtype=torch.int32),
            )
        logits = model.forward(ids, pos, meta, pool, torch.tensor([ids.numel() - 1]))
        tokens.append(int(logits[0].argmax()))
    return tokens[len(prompt) :]


def next_token_logits(engine: Engine, tokens: list[int]) -> torch.Tensor:
    """Logits after `tokens`, from one causal prefill of the whole sequence (no cache involved)."""
    n = len(tokens)
    model = engine.rt.model
    dev = model.device
    cfg = model.config
    layout = KVLayout(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 16, model.dtype)
    pool = allocate_pool(layout, 1, dev)
    meta = AttentionMetadata(
        n,
        torch.tensor([0, n], dtype=torch.int32, device=dev),
        n,
        torch.full((n,), -1, device=dev),
        torch.zeros((0, 1), dtype=torch.int32, device=dev),
        torch.zeros(0, dtype=torch.int32, device=dev),
    )
    return model.forward(
        torch.tensor(tokens, device=dev),
        torch.arange(n, device=dev),
        meta,
        pool,
        torch.tensor([n - 1], device=dev),
    )[0].cpu()


def assert_greedy_equal(
    engine: Engine,
    prompts_by_id: dict[str, list[int]],
    expected: dict[str, list[int]],
    got: dict[str, list[int]],
    max_diverged_share: float = 0.1,
) -> None:
    """Greedy tokens must be identical, except where two tokens tie to within float rounding.

    The two runs sum attention in different orders (GPU kernel vs CPU kernel, decode vs recompute),
    so a near-tie may flip; a flip on a clear choice, or many flips, is a bug. After a legitimate
    flip the histories differ and the rest of that request is not compared.
    """
    assert expected.keys() == got.keys()
    diverged = 0
    for rid, want in expected.items():
        have = got[rid]
        assert len(have) == len(want), f"{rid}: {len(have)} tokens, expected {len(want)}"
        if have == want:
            continue
        j = next(i for i, (a, b) in enumerate(zip(want, have, strict=True)) if a != b)
        logits = next_token_logits(engine, prompts_by_id[rid] + want[:j])
        gap = abs(float(logits[want[j]] - logits[have[j]]))
        assert gap < 1e-2 * float(logits.abs().max()), (
            f"{rid}: token {j} differs on a clear choice (gap {gap})"
        )
        diverged += 1
    assert diverged <= max_diverged_share * len(expected), (
        f"{diverged} of {len(expected)} requests diverged"
    )


def test_batched_greedy_matches_single_request_forward(tmp_path):
    engine = make_engine(tmp_path, **{"scheduler.policy": "gpu-only"})
    ps = prompts(6)
    for i, p in enumerate(ps):
        engine.add_request(f"r{i}", p, GREEDY)
    outs = run_all(engine)
    for i, p in enumerate(ps):
        assert tokens_of(outs[f"r{i}"]) == reference_greedy(engine, p, GREEDY.max_tokens)
        assert outs[f"r{i}"][-1].finish_reason == FinishReason.LENGTH
    assert_all_free(engine)


# A GPU pool of 32 blocks: swaps and CPU placement. fp16, not bf16: a random model's top logits
# lie within ~1e-3 of each other, and bf16's 8-bit mantissa turns the different summation orders
# of the two attention kernels into flipped near-ties.
SMALL_GPU_POOL = {
    "cache.gpu_kv_gib": 32 * 16 * 1024 / 2**30,
    "cache.cpu_kv_gib": 0.01,
    "model.dtype": "float16",
}


@pytest.mark.parametrize("policy", ["neo", "auto"])
def test_neo_mode_greedy_equals_gpu_only(tmp_path, policy):
    """A small GPU pool forces swaps and CPU placement; tokens must not change."""
    ps = prompts(24, seed=1)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    results = {}
    for mode in ("gpu-only", policy):
        engine = make_engine(tmp_path, **{"scheduler.policy": mode}, **SMALL_GPU_POOL)
        for i, p in enumerate(ps):
            engine.add_request(f"r{i}", p, params)
        on_cpu: list[int] = []
        outs = run_all(engine, after_step=lambda e, seen=on_cpu: seen.append(
            e.stats()["decoding_cpu"]))
        seen_cpu = max(on_cpu) > 0
        results[mode] = {k: tokens_of(v) for k, v in outs.items()}
        assert_all_free(engine)
        share = engine.stats()["cpu_pool"]["computing_share"]
        scale = engine.stats()["cpu_cost_scale"]
        handoff = engine.stats()["pipeline_handoff"]
        # Only pure decode iterations that pipelined measure the hand-off, within its bound.
        assert handoff["samples"] <= engine.stats()["iterations"]["pipelined"]
        assert 0.0 <= handoff["per_layer_us"] <= 1e3
        if mode == "neo":
            assert seen_cpu, "the small GPU pool should have pushed requests to the CPU"
            assert share is not None and 0 < share <= 1  # the workers' time, within the pool's
            # Offloaded iterations moved the profiled CPU cost (no measurement matches it exactly).
            assert scale["samples"] > 0 and scale["measured_over_profiled"] != 1.0
            # The guard acts under auto only; under neo it measures nothing (nor logs stops).
            assert engine.stats()["offload_guard"]["gpu_only_measured_over_predicted"] is None
        if mode == "gpu-only":
            assert share is None  # nothing ran on the pool
            assert scale == {"measured_over_profiled": 1.0, "fixed_us": 0.0, "samples": 0}
            # The hand-off is the profile's, as timed at start (none learned).
            assert handoff["samples"] == 0
            assert handoff["per_layer_us"] == handoff["profiled_us"] == round(
                engine.rt.profile.pipeline_handoff * 1e6, 1
            )
    assert_greedy_equal(
        engine, {f"r{i}": p for i, p in enumerate(ps)}, results["gpu-only"], results[policy]
    )


def test_a_restarted_engine_starts_from_the_corrections_its_predecessor_measured(
    tmp_path, monkeypatch
):
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    engine = make_engine(tmp_path, **{"scheduler.policy": "neo"}, **SMALL_GPU_POOL)
    assert not engine.stats()["profile"]["corrections_restored"]  # a new profile has none
    stored = list((tmp_path / "profiles").glob("*.corrections.json"))
    assert not stored
    monkeypatch.setattr(corrections, "SAVE_EVERY_S", 0.0)  # saved while serving, not only at close
    for i, p in enumerate(prompts(12, seed=3)):
        engine.add_request(f"r{i}", p, params)
    run_all(engine)
    measured = engine.rt.scheduler.cost.state()
    assert measured["cpu_samples"] > 0
    (stored,) = (tmp_path / "profiles").glob("*.corrections.json")
    assert orjson.loads(stored.read_bytes())["cpu_samples"] == measured["cpu_samples"]
    engine.close()
    again = make_engine(tmp_path, **{"scheduler.policy": "neo"}, **SMALL_GPU_POOL)
    try:
        assert again.stats()["profile"]["corrections_restored"]
        assert again.rt.scheduler.cost.state() == measured
        assert again.stats()["cpu_cost_scale"]["samples"] == measured["cpu_samples"]
    finally:
        again.close()
    # Measured again (neoctl profile), the profile starts over.
    cfg = again.rt.cfg
    fresh = Engine(cfg, runtime=build_runtime(cfg, refresh_profile=True))
    try:
        assert not fresh.stats()["profile"]["corrections_restored"]
        assert fresh.rt.scheduler.cost.state()["cpu_samples"] == 0
    finally:
        fresh.close()


def test_auto_paused_by_the_guard_brings_cpu_requests_home(tmp_path):
    """Requests on the CPU (placed there under neo), then policy auto with offloading paused by
    the guard: from then on nothing new goes to the CPU and what it holds leaves it, none is
    dropped, and the tokens are those of GPU-only."""
    ps = prompts(24, seed=1)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    def run(policy: str, after_step=None) -> tuple[Engine, dict[str, list[int]]]:
        engine = make_engine(tmp_path, **{"scheduler.policy": policy}, **SMALL_GPU_POOL)
        for i, p in enumerate(ps):
            engine.add_request(f"r{i}", p, params)
        outs = run_all(engine, after_step=after_step)
        assert all(o[-1].finish_reason == FinishReason.LENGTH for o in outs.values())
        assert_all_free(engine)
        return engine, {k: tokens_of(v) for k, v in outs.items()}

    on_cpu_after_pause: list[int] = []

    def pause_once_on_the_cpu(engine: Engine) -> None:
        on_cpu = engine.stats()["decoding_cpu"]
        if engine.limits.policy == "auto":
            on_cpu_after_pause.append(on_cpu)
        elif on_cpu > 0:
            engine.tune(policy="auto")
            engine.guard._blocked_until = 10**9  # what a losing verdict sets

    _, expected = run("gpu-only")
    engine, got = run("neo", pause_once_on_the_cpu)
    assert on_cpu_after_pause, "the small GPU pool should have used the CPU"
    # Requests that cost less to finish on the CPU than to recompute may stay there a while.
    assert on_cpu_after_pause == sorted(on_cpu_after_pause, reverse=True)
    assert on_cpu_after_pause[-1] == 0
    assert_greedy_equal(engine, {f"r{i}": p for i, p in enumerate(ps)}, expected, got)


def test_the_guard_is_told_which_cpu_decodes_were_chosen(tmp_path):
    """Under auto the guard judges offloading the scheduler chose; the aged decodes of requests on
    their way home (here: offloading paused) reach it marked as such, and it keeps no sample of
    them."""
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    engine = make_engine(tmp_path, **{"scheduler.policy": "neo"}, **SMALL_GPU_POOL)
    for i, p in enumerate(prompts(24, seed=1)):
        engine.add_request(f"r{i}", p, params)
    calls: list[tuple[int, int, bool]] = []
    engine.iteration_stats.trace = trace = []

    def pause_once_on_the_cpu(engine: Engine) -> None:
        if engine.limits.policy == "neo" and engine.stats()["decoding_cpu"] > 0:
            engine.tune(policy="auto")
            guard = engine.guard
            guard._blocked_until = 10**9  # what a losing verdict sets
            record = guard.record

            def spy(step, num_tokens, elapsed_s, predicted_s, num_gpu_tokens, gpu_alone_s,
                    chosen=True):  # fmt: skip
                calls.append((num_tokens, num_gpu_tokens, chosen))
                record(step, num_tokens, elapsed_s, predicted_s, num_gpu_tokens, gpu_alone_s,
                       chosen=chosen)  # fmt: skip

            guard.record = spy

    run_all(engine, after_step=pause_once_on_the_cpu)
    assert_all_free(engine)
    with_cpu = [c for c in calls if c[1] < c[0]]
    assert with_cpu, "aged CPU decodes should have run while offloading was paused"
    assert not any(chosen for *_, chosen in with_cpu)
    assert sum(r["sends_home"] for r in trace) >= len(with_cpu)
    assert engine.guard.snapshot()["offload_gain"] is None


def test_stop_conditions_and_finish_reasons(tmp_path):
    engine = make_engine(tmp_path, **{"scheduler.policy": "gpu-only"})
    p = prompts(1, seed=3)[0]
    free_run = reference_greedy(engine, p, 8)
    stop_at = free_run[3]
    engine.add_request(
        "stop", p, SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(stop_at,))
    )
    engine.add_request("len", p, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    outs = run_all(engine)
    assert tokens_of(outs["stop"]) == free_run[: free_run.index(stop_at) + 1]
    assert outs["stop"][-1].finish_reason == FinishReason.STOP
    assert tokens_of(outs["len"]) == free_run[:5]
    assert outs["len"][-1].finish_reason == FinishReason.LENGTH
    assert [o.finished for o in outs["len"]] == [False] * 4 + [True]
    assert_all_free(engine)


def test_bad_requests_get_errors_and_nothing_else_breaks(tmp_path):
    engine = make_engine(tmp_path)
    engine.add_request("empty", [], GREEDY)
    engine.add_request("vocab", [1, 2, 10**6], GREEDY)
    engine.add_request("long", [1] * 5000, GREEDY)
    engine.add_request("ok", [1, 2, 3], GREEDY)
    engine.add_request("ok", [4, 5], GREEDY)
    outs = run_all(engine)
    for rid, text, kind in (("empty", "empty", EngineError.INVALID),
                            ("vocab", "token ids", EngineError.INVALID),
                            ("long", "5000 tokens", EngineError.PROMPT_TOO_LONG)):
        last = outs[rid][-1]
        assert last.finish_reason == FinishReason.ERROR and text in last.error
        assert last.error_kind == kind
    finals = [o for o in outs["ok"] if o.finished]
    assert len(finals) == 2  # one error for the duplicate id, one normal end
    assert {o.finish_reason for o in finals} == {FinishReason.ERROR, FinishReason.LENGTH}
    assert {o.error_kind for o in finals} == {EngineError.INVALID, None}
    assert len(tokens_of(outs["ok"])) == GREEDY.max_tokens
    assert_all_free(engine)


def test_a_request_outgrowing_the_kv_cache_ends_length_and_says_why(tmp_path):
    """A GPU pool of a few 16-token blocks and no host pool: a 20-token prompt asking for 100
    more ends when its KV no longer fits, with a `length` that names the cause; one that fits
    ends with a plain `length`, and every block is free."""
    engine = make_engine(tmp_path, **{"scheduler.policy": "gpu-only",
                                      "cache.gpu_kv_gib": 3 * 32 * 1024 / 2**30,
                                      "cache.cpu_kv_gib": 0.0, "model.dtype": "float16"})
    blocks = engine.stats()["kv_gpu"]["blocks_total"]
    assert 2 <= blocks < 8  # holds the prompt, not all of the output
    engine.add_request("big", [7] * 20, SamplingParams(max_tokens=100, ignore_eos=True))
    outs = run_all(engine)
    last = outs["big"][-1]
    assert last.finish_reason == FinishReason.LENGTH and last.error is None
    assert last.detail == ("the KV cache cannot hold more of this request: its KV outgrows the "
                           f"largest pool it may use ({blocks} blocks)")
    assert 0 < len(tokens_of(outs["big"])) < 100
    engine.add_request("small", [7] * 4, SamplingParams(max_tokens=8, ignore_eos=True))
    last = run_all(engine)["small"][-1]
    assert last.finish_reason == FinishReason.LENGTH and last.detail is None
    assert_all_free(engine)


def test_abort_frees_blocks_and_ends_once(tmp_path):
    engine = make_engine(tmp_path)
    engine.add_request(
        "a", [5] * 40, SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    )
    engine.add_request(
        "b", [6] * 10, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    )
    engine.step()
    engine.step()
    assert engine.gpu_blocks.num_used > 0
    engine.abort_request("a")
    engine.abort_request("missing")
    outs = run_all(engine)
    assert outs["a"][-1].finish_reason == FinishReason.ABORT
    assert sum(o.finished for o in outs["a"]) == 1
    assert outs["b"][-1].finish_reason == FinishReason.LENGTH
    assert_all_free(engine)


def test_seeded_sampling_is_reproducible_and_batch_independent(tmp_path):
    params = SamplingParams(
        max_tokens=10, temperature=0.8, top_k=50, top_p=0.9, seed=1234, ignore_eos=True
    )
    engine = make_engine(tmp_path)
    engine.add_request("alone", [7, 8, 9], params)
    alone = tokens_of(run_all(engine)["alone"])
    for i, p in enumerate(prompts(5, seed=9)):
        engine.add_request(
            f"x{i}", p, SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)
        )
    engine.add_request("batched", [7, 8, 9], params)
    assert tokens_of(run_all(engine)["batched"]) == alone
    assert len(set(alone)) > 1


def recording_plans(engine: Engine) -> list:
    """The plans the engine's scheduler makes from now on, in order."""
    plans = []
    schedule = engine.rt.scheduler.schedule

    def record(*args, **kwargs):
        plans.append(schedule(*args, **kwargs))
        return plans[-1]

    engine.rt.scheduler.schedule = record
    return plans


@pytest.mark.parametrize("policy", ["gpu-only", "neo"])
def test_prompts_over_the_token_budget_are_prefilled_in_chunks_with_unchanged_tokens(
    tmp_path, policy
):
    """Prompts up to ~5x the token budget (the GPU pool holds 256 tokens) among short ones, under
    swaps and CPU decodes too: the greedy tokens are those of each request alone, prefilled
    whole."""
    rng = random.Random(5)
    ps = prompts(10, seed=5) + [[rng.randrange(256) for _ in range(n)] for n in (64, 65, 150, 230)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    engine = make_engine(tmp_path, **{"scheduler.policy": policy,
                                      "scheduler.max_tokens_in_batch": 48}, **SMALL_GPU_POOL)
    plans = recording_plans(engine)
    for i, p in enumerate(ps):
        engine.add_request(f"r{i}", p, params)
    outs = run_all(engine)
    assert_all_free(engine)
    chunks = [n for plan in plans for n in plan.chunked.values()]
    assert len(chunks) >= 230 // 48 and max(chunks) <= 48
    if policy == "neo":
        assert any(plan.decode_cpu_b0 or plan.decode_cpu_b1 for plan in plans)
    got = {k: tokens_of(v) for k, v in outs.items()}
    expected = {f"r{i}": reference_greedy(engine, p, params.max_tokens) for i, p in enumerate(ps)}
    assert_greedy_equal(engine, {f"r{i}": p for i, p in enumerate(ps)}, expected, got)


ONLY_THE_HOST_HOLDS_IT = {"scheduler.policy": "neo", "cache.gpu_kv_gib": 8 * 16 * 2048 / 2**30,
                          "cache.cpu_kv_gib": 0.01, "model.dtype": "float16"}  # fmt: skip


def test_prompts_only_the_host_pool_holds_are_prefilled_there_in_chunks(tmp_path):
    """Prompts longer than the GPU pool (128 tokens) and than the token budget go to the host pool
    in chunks, each chunk's attention reading the earlier chunks' KV from there; the greedy
    tokens are those of each request alone, prefilled whole."""
    rng = random.Random(11)
    ps = prompts(3, seed=11) + [[rng.randrange(256) for _ in range(n)] for n in (300, 257, 211)]
    engine = make_engine(tmp_path, **ONLY_THE_HOST_HOLDS_IT)
    assert engine.stats()["kv_gpu"]["blocks_total"] == 8
    assert engine.tune(max_tokens_in_batch=64)["max_prefill_tokens"] > 300
    plans = recording_plans(engine)
    for i, p in enumerate(ps):
        engine.add_request(f"r{i}", p, GREEDY)
    outs = run_all(engine)
    assert_all_free(engine)
    cpu_chunks = [n for plan in plans for sid, n in plan.chunked.items() if sid in plan.prefill_cpu]
    assert len(cpu_chunks) >= 300 // 64 and max(cpu_chunks) <= 64
    got = {k: tokens_of(v) for k, v in outs.items()}
    expected = {f"r{i}": reference_greedy(engine, p, GREEDY.max_tokens) for i, p in enumerate(ps)}
    assert_greedy_equal(engine, {f"r{i}": p for i, p in enumerate(ps)}, expected, got)


def test_prompts_only_the_host_pool_holds_end_as_too_long_once_the_policy_keeps_to_the_gpu(
    tmp_path, caplog
):
    """Queued, and one part-way in on the CPU: under gpu-only none of them can be served, and
    each says why; nothing is left behind."""
    engine = make_engine(tmp_path, **ONLY_THE_HOST_HOLDS_IT)
    engine.tune(max_batch_size=1, max_tokens_in_batch=64)  # one at a time, in chunks
    for i in range(8):
        engine.add_request(f"long{i}", [2] * (300 + i), GREEDY)
    outs: dict[str, list[RequestOutput]] = {}
    for out in engine.step():  # the first chunk of the first prompt
        outs.setdefault(out.request_id, []).append(out)
    [part_way] = engine.running.values()
    assert part_way.residence == Residence.CPU and 0 < part_way.num_computed_tokens < 300
    engine.tune(policy="gpu-only")
    with caplog.at_level(logging.WARNING, logger="neod.sched.scheduler"):
        for rid, more in run_all(engine).items():
            outs.setdefault(rid, []).extend(more)
    for i in range(8):
        [last] = outs[f"long{i}"]
        assert last.finish_reason == FinishReason.ERROR
        assert last.error_kind == EngineError.PROMPT_TOO_LONG
        assert last.error.endswith(  # dropped, with the bound that binds
            f"{300 + i} tokens to prefill need {-(-(300 + i) // 16)} KV blocks, more than the "
            "largest pool the policy may use (8 blocks)"
        )
    assert_all_free(engine)
    # One log line for the pass that dropped them, naming the first few.
    [line] = [r.getMessage() for r in caplog.records if "cannot be served" in r.getMessage()]
    assert line.startswith("8 sequence(s) cannot be served: seq ") and "and 3 more" in line


def test_tune_validates_and_applies(tmp_path):
    engine = make_engine(tmp_path, **{"scheduler.policy": "neo"})
    assert engine.tune(policy="gpu-only", max_batch_size=8)["max_batch_size"] == 8
    assert engine.stats()["policy"] == "gpu-only"
    with pytest.raises(ValueError, match="policy"):
        engine.tune(policy="fast")
    with pytest.raises(ValueError, match="unknown"):
        engine.tune(speed=3)
    assert engine.stats()["max_batch_size"] == 8
    applied = engine.tune(cpu_stretch=0.3, cpu_min_gain=0.05)
    assert (applied["cpu_stretch"], applied["cpu_min_gain"]) == (0.3, 0.05)
    assert engine.rt.scheduler.split_rule == SplitRule(min_gain=0.05, stretch=0.3)
    with pytest.raises(ValueError, match=r"stretch in \[0, 100\], got 0.05, -0.5"):
        engine.tune(cpu_stretch=-0.5, max_batch_size=4)
    with pytest.raises(ValueError, match=r"min_gain must be in \[0, 1\]"):
        engine.tune(cpu_min_gain=2.0)  # as neod.toml and the control protocol refuse it
    with pytest.raises(ValueError, match="must be numbers"):
        engine.tune(cpu_min_gain=True)
    assert engine.rt.scheduler.split_rule.stretch == 0.3 and engine.stats()["max_batch_size"] == 8
    assert engine.stats()["cpu_stretch"] == 0.3
    assert engine.tune(cpu_round_robin=1)["cpu_round_robin"] == 1
    assert engine.rt.scheduler.split_rule == SplitRule(min_gain=0.05, stretch=0.3, round_robin=1)
    for bad in (0, 65, 2.0, True):
        with pytest.raises(ValueError, match=r"round_robin must be an integer in \[1, 64\]"):
            engine.tune(cpu_round_robin=bad, cpu_stretch=1.0)
    assert engine.stats()["cpu_round_robin"] == 1 and engine.stats()["cpu_stretch"] == 0.3


def test_resizing_the_cpu_pool_brings_its_profile_along(tmp_path, monkeypatch):
    """tune(cpu_threads=N): the pool is rebuilt pinned, the CPU side of the profile is measured
    for N threads (the GPU tables kept) or reused if stored; a bad size or a failed measurement
    leaves the old pool and profile in force."""
    from neod.engine import profiler

    timed_with = []

    def fake_point(self, b, ctx):  # a pool of n threads attends n times faster
        timed_with.append(self.executor.cpu_attention.num_threads)
        return 1e-3 * b / self.executor.cpu_attention.num_threads

    monkeypatch.setattr(profiler.Profiler, "_cpu_point", fake_point)
    engine = make_engine(
        tmp_path, **{"scheduler.policy": "neo", "cache.cpu_kv_gib": 0.01, "cpu.threads": 1}
    )
    start = engine.rt.profile
    assert start.key.pool_threads == 1 and set(timed_with) == {1}
    full_runs = []
    monkeypatch.setattr(profiler.Profiler, "run", lambda self, key: full_runs.append(key))

    timed_with.clear()
    guard = engine.guard
    assert engine.tune(cpu_threads=2)["cpu_threads"] == 2
    assert engine.guard is not guard  # its verdicts were on the old pool
    pool = engine.rt.cpu_attention
    assert pool.num_threads == 2 and engine.rt.executor.cpu_attention is pool
    resized = engine.rt.profile
    assert resized.key.pool_threads == 2 and set(timed_with) == {2} and full_runs == []
    assert resized.linear == start.linear and resized.gpu_decode_attn == start.gpu_decode_attn
    assert resized.cpu_decode_attn(8, 4096) == pytest.approx(4e-3, rel=0.05)
    # The paced fit (timed at start: it writes both pools) is the old size's, over the new table.
    assert resized.cpu_paced == start.cpu_paced is not None
    cost = engine.rt.scheduler.cost
    scale, fixed = resized.cpu_paced
    assert cost.cpu_decode_attn_s(8, 4096) == pytest.approx(scale * 4e-3 + fixed, rel=0.05)
    assert len(list((tmp_path / "profiles").glob("profile-*.json"))) == 2
    shown = engine.stats()["profile"]
    assert shown["pool_threads"] == 2 and shown["cpu_measured_at"]
    assert shown["cpu_paced"] == {"scale": round(scale, 4), "fixed_us": round(fixed * 1e6, 1)}
    assert (tmp_path / "profiles" / f"profile-{shown['id']}.json").is_file()
    prompt = [5, 6, 7, 8]
    engine.add_request("after", prompt, GREEDY)
    assert tokens_of(run_all(engine)["after"]) == reference_greedy(engine, prompt, 12)
    assert_all_free(engine)

    timed_with.clear()
    engine.tune(cpu_threads=1)  # measured at start: the stored profile comes back
    assert timed_with == [] and engine.rt.profile.key.pool_threads == 1

    with pytest.raises(ValueError, match="pool threads requested"):
        engine.tune(cpu_threads=10_000)

    def broken(self, b, ctx):
        raise RuntimeError("pool died")

    monkeypatch.setattr(profiler.Profiler, "_cpu_point", broken)
    (tmp_path / "profiles" / "moved").mkdir()
    for stored in (tmp_path / "profiles").glob("profile-*.json"):
        stored.rename(tmp_path / "profiles" / "moved" / stored.name)
    with pytest.raises(RuntimeError, match="pool died.*the pool of 1 threads and its profile"):
        engine.tune(cpu_threads=2)
    assert engine.rt.cpu_threads == engine.rt.cpu_attention.num_threads == 1
    assert engine.rt.executor.cpu_attention is engine.rt.cpu_attention
    assert engine.rt.profile.key.pool_threads == 1
    engine.add_request("still", prompt, GREEDY)
    assert tokens_of(run_all(engine)["still"]) == reference_greedy(engine, prompt, 12)
    engine.close()


def check_live_tuning_keeps_cpu_requests_tokens(tmp_path, pool: dict, knobs: dict) -> None:
    """Tune the engine while requests decode on the CPU (`pool` forces that); tokens must equal
    GPU-only's and every block must come back."""
    ps = prompts(16, seed=3)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    engine = make_engine(tmp_path, **{"scheduler.policy": "gpu-only"}, **pool)
    for i, p in enumerate(ps):
        engine.add_request(f"r{i}", p, params)
    expected = {k: tokens_of(v) for k, v in run_all(engine).items()}

    engine = make_engine(tmp_path, **{"scheduler.policy": "neo"}, **pool)
    for i, p in enumerate(ps):
        engine.add_request(f"r{i}", p, params)
    costs_before_tuning = []

    def tune_once_on_the_cpu(e: Engine) -> None:
        if not costs_before_tuning and e.stats()["decoding_cpu"] >= 2:
            costs_before_tuning.append(e.rt.scheduler.cost)
            e.tune(**knobs)

    outs = run_all(engine, after_step=tune_once_on_the_cpu)
    assert costs_before_tuning, "requests should have decoded on the CPU"
    if "cpu_threads" in knobs:
        assert engine.rt.profile.key.pool_threads == knobs["cpu_threads"]
        # The CPU cost correction belonged to the old pool: it starts over with the new profile.
        assert engine.rt.scheduler.cost is not costs_before_tuning[0]
    got = {k: tokens_of(v) for k, v in outs.items()}
    assert_greedy_equal(engine, {f"r{i}": p for i, p in enumerate(ps)}, expected, got)
    assert_all_free(engine)


@pytest.mark.parametrize("knobs", [{"cpu_threads": 1}, {"policy": "gpu-only"}])
def test_live_tuning_while_requests_decode_on_the_cpu_keeps_their_tokens(tmp_path, knobs):
    """A resized pool is measured on the live host KV pool, which must not touch the KV of the
    requests decoding from it; switching to gpu-only brings them home."""
    check_live_tuning_keeps_cpu_requests_tokens(tmp_path, SMALL_GPU_POOL, knobs)


class ScriptedScheduler:
    """Drives every data path on purpose: CPU prefills, swaps both ways every few steps, CPU decodes
    in both sub-batches of a pipelined iteration, GPU decodes beside them."""

    split_rule = SplitRule()  # reported by the engine's stats, unused by the script

    def schedule(self, waiting, running, cache, limits, step):
        from neod.sched import Plan, Residence

        plan = Plan(pipelined=True)
        for s in waiting:
            (plan.prefill_cpu if s.seq_id % 3 == 2 else plan.prefill_gpu).append(s.seq_id)
        for s in running:
            sid, on_gpu = s.seq_id, s.residence == Residence.GPU
            if on_gpu and step % 4 == 2 and sid % 2 == 1:
                plan.swap_out.append(sid)
                on_gpu = False
            elif not on_gpu and step % 4 == 0 and sid % 2 == 0:
                plan.swap_in.append(sid)
                on_gpu = True
            if on_gpu:
                plan.decode_gpu.append(sid)
            else:
                (plan.decode_cpu_b0 if sid % 4 < 2 else plan.decode_cpu_b1).append(sid)
        return plan


def test_pipelined_swaps_and_cpu_prefills_keep_greedy_tokens(tmp_path):
    ps = prompts(10, seed=5)
    params = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
    engine = make_engine(tmp_path, **{"scheduler.policy": "gpu-only", "model.dtype": "float16"})
    for i, p in enumerate(ps):
        engine.add_request(f"r{i}", p, params)
    expected = {k: tokens_of(v) for k, v in run_all(engine).items()}

    engine = make_engine(
        tmp_path, **{"scheduler.policy": "neo", "cache.cpu_kv_gib": 0.01, "model.dtype": "float16"}
    )
    engine.rt.scheduler = ScriptedScheduler()
    for i, p in enumerate(ps):
        engine.add_request(f"r{i}", p, params)
    got = {k: tokens_of(v) for k, v in run_all(engine).items()}
    assert_greedy_equal(engine, {f"r{i}": p for i, p in enumerate(ps)}, expected, got)
    assert engine.stats()["iterations"]["pipelined"] > 0
    assert_all_free(engine)


def test_close_stops_the_cpu_pool(tmp_path):
    engine = make_engine(tmp_path, **{"scheduler.policy": "neo", "cache.cpu_kv_gib": 0.01})
    engine.add_request("a", [1, 2, 3], GREEDY)
    run_all(engine)
    engine.close()
    assert engine.rt.cpu_attention.closed


def test_a_failed_step_loses_no_final_output_and_no_block(tmp_path):
    engine = make_engine(tmp_path, **{"scheduler.policy": "gpu-only"})
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=50, temperature=0.0))
    engine.add_request("b", [4, 5, 6], SamplingParams(max_tokens=50, temperature=0.0))
    engine.step()
    engine.abort_request("a")  # ends inside the next step, before the forward pass

    def broken(batches, while_waiting):
        raise RuntimeError("device lost")

    engine.rt.executor.run = broken
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    finals = {o.request_id: o for o in engine.fail_all("the engine step failed") if o.finished}
    assert finals["a"].finish_reason == FinishReason.ABORT
    assert finals["b"].finish_reason == FinishReason.ERROR
    assert "step failed" in finals["b"].error
    assert not engine.has_unfinished()
    assert_all_free(engine)


@pytest.mark.parametrize("faster", ["scores", "scores+values"])
def test_the_profile_chooses_the_faster_tile_path_and_keeps_it(tmp_path, monkeypatch, faster):
    """cpu.amx_values = auto: the profile times the CPU program with and without the V products on
    AMX, keeps the faster, and a reused profile brings its choice back (software tiles where the
    host has no AMX, so every host runs this)."""
    from neod.cython import load_native
    from neod.engine import profiler
    from neod.kernels import cpu_attention

    soft = not load_native().AMX_SUPPORTED
    hard_switch, before = cpu_attention.use_amx, cpu_attention.amx_in_use()
    def switch(on: bool, *, values: bool = True) -> bool:
        return hard_switch(on, values=values, soft=soft)

    monkeypatch.setattr(cpu_attention, "use_amx", switch)
    monkeypatch.setattr(profiler, "use_amx", switch)
    timed = []

    def fake_point(self, b, ctx):
        timed.append(cpu_attention.amx_in_use())
        return 1e-3 if cpu_attention.amx_in_use() == faster else 2e-3

    monkeypatch.setattr(profiler.Profiler, "_cpu_point", fake_point)
    overrides = {"scheduler.policy": "neo", "cache.cpu_kv_gib": 0.01, "cpu.amx_values": "auto"}
    try:
        engine = make_engine(tmp_path, **overrides)
        assert {"scores", "scores+values"} <= set(timed)
        assert engine.rt.cpu_tile_path == faster == cpu_attention.amx_in_use()
        assert engine.stats()["cpu_pool"]["amx"] == faster
        (stored,) = (tmp_path / "profiles").glob("profile-*.json")
        assert orjson.loads(stored.read_bytes())["cpu_tile_path"] == faster
        engine.close()

        cpu_attention.use_tile_path("scores" if faster == "scores+values" else "scores+values")
        timed.clear()
        engine = make_engine(tmp_path, **overrides)  # reuses the stored profile: nothing timed
        assert timed == [] and engine.rt.cpu_tile_path == faster == cpu_attention.amx_in_use()
        engine.add_request("a", [1, 2, 3], GREEDY)
        assert len(tokens_of(run_all(engine)["a"])) == GREEDY.max_tokens
        engine.close()

        engine = make_engine(tmp_path, **{**overrides, "cpu.amx_values": "off"})
        assert engine.rt.cpu_tile_path == "scores" == cpu_attention.amx_in_use()
        engine.close()
    finally:
        hard_switch(before is not None, values=before == "scores+values")


def test_the_cpu_rows_q_k_v_are_one_fused_slab():
    """The host copy takes the fused projection rows in one piece; anything else is refused."""
    from neod.engine.executor import _fused_rows

    fused = torch.randn(5, 4 + 2 + 2, 16)  # [T, Hq + 2 Hkv, D]
    q, k, v = fused.split([4, 2, 2], dim=1)
    assert torch.equal(_fused_rows(q, k, v)[2:], fused[2:])
    assert torch.equal(_fused_rows(q[3:4], k[3:4], v[3:4]), fused[3:4])  # one row
    with pytest.raises(ValueError, match="views of one fused"):
        _fused_rows(q.contiguous(), k, v)
    with pytest.raises(ValueError, match="views of one fused"):
        _fused_rows(q, v, k)  # out of order


def test_the_split_rule_settings_reach_the_scheduler(tmp_path):
    engine = make_engine(tmp_path, **{"scheduler.cpu_stretch": 0.4, "scheduler.cpu_min_gain": 0.2})
    assert engine.rt.scheduler.split_rule == SplitRule(min_gain=0.2, stretch=0.4)
    assert make_engine(tmp_path).rt.scheduler.split_rule == SplitRule()  # the defaults of neod.toml


def test_the_executor_refuses_cpu_rows_its_staging_buffers_cannot_hold(tmp_path):
    """The copies to and from the host staging buffers are raw on a GPU host: a sub-batch whose
    CPU rows overflow them is refused before anything is issued."""
    executor = make_engine(tmp_path).rt.executor
    rows, tokens = executor._buffers[0].qkv.shape[0], executor._buffers[0].prefill_k.shape[0]

    def batch(num_tokens, num_cpu_decodes, prefill_rows):
        return SimpleNamespace(num_tokens=num_tokens, num_cpu_decodes=num_cpu_decodes,
                               cpu_decode_start=num_tokens - num_cpu_decodes,
                               cpu_prefill_rows=prefill_rows)  # fmt: skip

    for bad in (
        batch(rows + 1, rows + 1, (0, 0)),  # more CPU decodes than staged rows
        batch(tokens + 2, 1, (0, tokens + 1)),  # a CPU prefill longer than the staged K/V
        batch(8, 1, (5, 9)),  # prefill rows past the batch
    ):
        with pytest.raises(ValueError, match="staging buffers"):
            executor.run([bad])


def test_planning_ahead_keeps_tokens_and_plans_again_where_the_state_differs(tmp_path):
    """Each step planned while the previous one computes (forced on here, where the forward pass
    is synchronous and nothing overlaps): the same tokens and ends as planning in the step. Every
    step uses the plan made ahead, requests ending on length included (their blocks freed in
    the plan's view), except the first, the one after requests arrived and the one after a
    request stopped on a token: those plan again."""
    ps = prompts(10, seed=5)
    probe = make_engine(tmp_path, **{"scheduler.policy": "gpu-only"})
    stops = {i: reference_greedy(probe, ps[i], 4)[3] for i in (0, 3)}

    def params(i: int) -> SamplingParams:
        stop = (stops[i],) if i in stops else ()
        return SamplingParams(max_tokens=5 + 3 * i, temperature=0.0, ignore_eos=True,
                              stop_token_ids=stop)  # fmt: skip

    results, replanned = {}, {}
    for ahead in (False, True):
        engine = make_engine(tmp_path, **{"scheduler.policy": "neo"}, **SMALL_GPU_POOL)
        engine.plan_ahead = ahead
        engine.iteration_stats.trace = []
        for i in range(8):
            engine.add_request(f"r{i}", ps[i], params(i))
        outs: dict[str, list[RequestOutput]] = {}
        expect_replan = [True]  # per traced iteration: the first has no plan made ahead
        for step in range(500):
            if step == 6:
                for i in (8, 9):
                    engine.add_request(f"r{i}", ps[i], params(i))
            new = engine.step()
            for out in new:
                outs.setdefault(out.request_id, []).append(out)
            stopped = any(o.finish_reason == FinishReason.STOP for o in new)
            expect_replan.append(step == 5 or stopped)
            if not engine.has_unfinished():
                break
        results[ahead] = {k: (tokens_of(v), v[-1].finish_reason) for k, v in outs.items()}
        replanned[ahead] = [not r["planned_ahead"] for r in engine.iteration_stats.trace]
        assert_all_free(engine)
        assert len(replanned[ahead]) == step + 1  # every step ran the model
    assert results[True] == results[False]
    assert sum(reason == FinishReason.STOP for _, reason in results[True].values()) >= 1
    assert all(replanned[False])
    assert replanned[True] == expect_replan[: len(replanned[True])]
    assert engine.stats()["iterations"]["planned_ahead_share"] > 0.5


def test_a_failed_plan_ahead_leaves_the_step_to_plan_itself(tmp_path):
    """Planning ahead runs while the device computes: a pass failing there must not fail the step
    in flight; the next step plans in its own time (where a failure would belong to it)."""
    engine = make_engine(tmp_path, **{"scheduler.policy": "neo"}, **SMALL_GPU_POOL)
    engine.plan_ahead = True
    engine.iteration_stats.trace = []
    schedule, calls = engine.rt.scheduler.schedule, []

    def flaky(*args):
        calls.append(args[-1])  # the step planned for
        if len(calls) == 2:  # the first pass made ahead
            raise RuntimeError("pass failed")
        return schedule(*args)

    engine.rt.scheduler.schedule = flaky
    for i, p in enumerate(prompts(4, seed=7)):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=6, temperature=0.0))
    outs = run_all(engine)
    assert all(v[-1].finished and v[-1].error is None for v in outs.values())
    planned = [r["planned_ahead"] for r in engine.iteration_stats.trace]
    assert planned[:3] == [False, False, True]  # the failed one replanned, later ones used
    assert calls[:4] == [1, 2, 2, 3]
    assert_all_free(engine)


def test_requests_posted_while_a_step_computes_join_the_plan_made_ahead(tmp_path):
    """Posted while the device computes step 3, a request is admitted before the next step is
    planned, which then keeps its plan. During step 5 come an addition, an abort of it and
    another addition: the first is admitted at once, the abort and what follows it wait for the
    next step's start (the step's own sequences must stay as they are), which then plans again."""
    engine = make_engine(tmp_path, **{"scheduler.policy": "neo"}, **SMALL_GPU_POOL)
    engine.plan_ahead = True
    engine.iteration_stats.trace = []
    ps = prompts(7, seed=11)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"r{i}", ps[i], params)
    posts = {3: [("add", "late")], 5: [("add", "x"), ("abort", "x"), ("add", "y")]}
    forward = engine.rt.forward

    def posting(batches, while_waiting=None):
        for kind, rid in posts.get(engine.step_index, ()):
            if kind == "add":
                engine.add_request(rid, ps[{"late": 4, "x": 5, "y": 6}[rid]], params)
            else:
                engine.abort_request(rid)
        return forward(batches, while_waiting)

    engine.rt.forward = posting
    outs = run_all(engine)
    planned = [r["planned_ahead"] for r in engine.iteration_stats.trace]
    assert planned[:7] == [False, True, True, True, True, False, True]  # steps 1 to 7
    assert outs["x"][-1].finish_reason == FinishReason.ABORT and tokens_of(outs["x"]) == []
    for rid in ("r0", "late", "y"):
        assert outs[rid][-1].finish_reason == FinishReason.LENGTH
        assert len(tokens_of(outs[rid])) == 12
    assert_all_free(engine)


def test_an_admission_failing_while_a_step_computes_is_retried_at_the_next_start(tmp_path):
    """A request posted during a step whose admission fails there (here once, as a device error
    would) is neither lost nor fails the step: it is admitted at the next step's start."""
    engine = make_engine(tmp_path, **{"scheduler.policy": "neo"}, **SMALL_GPU_POOL)
    engine.plan_ahead = True
    ps = prompts(2, seed=13)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    engine.add_request("a", ps[0], params)
    admit, forward, failures, computing = engine._admit, engine.rt.forward, [], []

    def admit_failing_once(*args):
        if computing and not failures:
            failures.append(engine.step_index)
            raise RuntimeError("device busy")
        return admit(*args)

    def posting(batches, while_waiting=None):
        if engine.step_index == 2:
            engine.add_request("b", ps[1], params)
        computing.append(True)
        try:
            return forward(batches, while_waiting)
        finally:
            computing.pop()

    engine._admit, engine.rt.forward = admit_failing_once, posting
    outs = run_all(engine)
    assert failures == [2]  # failed in step 2's wait, admitted at step 3's start
    assert outs["b"][-1].finish_reason == FinishReason.LENGTH and len(tokens_of(outs["b"])) == 5
    assert outs["a"][-1].finish_reason == FinishReason.LENGTH
    assert_all_free(engine)
