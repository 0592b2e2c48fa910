"""The offload guard: auto stops offloading when iterations that use the CPU are measured slower
than the GPU alone would have been in the same iterations."""

import pytest

from neod.engine.guard import BACKOFF_STEPS, MAX_BACKOFF_STEPS, MIN_SAMPLES, OffloadGuard


def gpu_only(guard: OffloadGuard, start: int, n: int, measured_over_predicted: float) -> int:
    for step in range(start, start + n):
        guard.record(step, 6, 0.04 * measured_over_predicted, 0.04, 6, 0.04)
    return start + n


def offloaded(guard: OffloadGuard, start: int, n: int, elapsed_s: float,
              predicted_s: float = 0.0, tokens: int = 15, chosen: bool = True) -> int:
    """Iterations of 6 GPU decodes (predicted 40 ms alone) plus CPU decodes."""
    for step in range(start, start + n):
        guard.record(step, tokens, elapsed_s, predicted_s or elapsed_s, 6, 0.04, chosen=chosen)
    return start + n


def test_blocks_when_offloading_is_measured_slower_then_retries():
    guard = OffloadGuard(margin=0.05)
    step = offloaded(guard, 0, MIN_SAMPLES - 1, 0.12)  # 125 tok/s against 150 alone
    assert guard.allows_offload(step)  # not enough samples yet
    step = offloaded(guard, step, 1, 0.12)
    assert not guard.allows_offload(step)
    assert guard.allows_offload(step + BACKOFF_STEPS)
    assert guard.snapshot()["offload_gain"] is None  # measured afresh after the pause
    assert guard.snapshot()["stops"] == 1


def test_keeps_offloading_while_it_pays():
    guard = OffloadGuard(margin=0.05)
    step = offloaded(guard, 0, 4 * MIN_SAMPLES, 0.08)  # 187.5 tok/s against 150
    assert guard.allows_offload(step)
    assert guard.snapshot()["offload_gain"] == pytest.approx(1.25)
    step = offloaded(guard, step, MIN_SAMPLES, 0.0975)  # 0.985x: within the margin
    assert guard.allows_offload(step)
    assert guard.snapshot()["stops"] == 0


def test_the_gpu_alone_is_judged_by_its_measured_accuracy():
    """GPU-only iterations measured 20% slower than predicted make the GPU alone's rate 125
    tok/s, which offloaded iterations at 0.11 s (136 tok/s) beat."""
    guard = OffloadGuard(margin=0.05)
    step = offloaded(guard, 0, 2 * MIN_SAMPLES, 0.11)
    assert not guard.allows_offload(step)
    guard = OffloadGuard(margin=0.05)
    step = gpu_only(guard, 0, 50, 1.2)
    step = offloaded(guard, step, 2 * MIN_SAMPLES, 0.11)
    assert guard.allows_offload(step)


def test_underestimated_iterations_that_beat_the_gpu_alone_keep_offloading():
    """Twice the predicted time, yet 187.5 tok/s against 150 alone: the rate decides."""
    guard = OffloadGuard()
    step = offloaded(guard, 0, 4 * MIN_SAMPLES, 0.08, predicted_s=0.04)
    assert guard.allows_offload(step)
    assert guard.snapshot()["offload_measured_over_predicted"] == pytest.approx(2.0)
    step = offloaded(guard, step, 2 * MIN_SAMPLES, 0.12, predicted_s=0.06)  # 125 tok/s: loses
    assert not guard.allows_offload(step)


def test_repeated_losses_pause_longer_and_a_paying_trial_resets_the_pause():
    def pause_after_losing(guard: OffloadGuard, step: int) -> tuple[int, int]:
        """Offloaded iterations at 125 tok/s (against 150 alone) until the guard stops them."""
        while guard.allows_offload(step + 1):
            step = offloaded(guard, step, 1, 0.12)
        resume = guard.snapshot()["blocked_until_step"]
        return resume - (step - 1), resume

    guard = OffloadGuard(margin=0.05)
    step, pauses = 0, []
    for _ in range(6):
        pause, step = pause_after_losing(guard, step)
        pauses.append(pause)
    assert pauses == [BACKOFF_STEPS * 2**i for i in range(5)] + [MAX_BACKOFF_STEPS]
    step = offloaded(guard, step, MIN_SAMPLES, 0.08)  # 187.5 tok/s: pays
    assert guard.allows_offload(step)
    assert pause_after_losing(guard, step)[0] == BACKOFF_STEPS


def test_aged_cpu_decodes_of_requests_on_their_way_home_are_not_judged():
    """While the scheduler brings the CPU's requests home, the aged ones decode where they are, at
    a loss by design: however many such iterations, offloading is not stopped, and the gain the
    next chosen offloading is judged on starts from its own iterations."""
    guard = OffloadGuard(margin=0.05)
    step = offloaded(guard, 0, 4 * MIN_SAMPLES, 0.12, chosen=False)  # 125 tok/s against 150
    assert guard.allows_offload(step)
    assert guard.snapshot()["offload_gain"] is None
    step = offloaded(guard, step, 1, 0.08)  # 187.5 tok/s, chosen
    assert guard.snapshot()["offload_gain"] == pytest.approx(1.25)
    # GPU-only iterations still set how the GPU alone is judged in the meantime.
    step = gpu_only(guard, step, 1, 1.2)
    step = offloaded(guard, step, 2 * MIN_SAMPLES, 0.2, chosen=False)
    assert guard.snapshot()["gpu_only_measured_over_predicted"] == pytest.approx(1.2)
    # Chosen offloading that loses is stopped as before.
    step = offloaded(guard, step, 2 * MIN_SAMPLES, 0.2)
    assert not guard.allows_offload(step)


def test_a_passing_slowdown_at_the_start_is_not_a_verdict():
    """The CPU slow for the first 20 offloaded iterations (125 tok/s against 150 alone), then at
    its usual pace (187.5 tok/s): offloading is never stopped, while a slowdown that lasts is."""
    guard = OffloadGuard(margin=0.05)
    step = offloaded(guard, 0, 20, 0.12)
    step = offloaded(guard, step, 4 * MIN_SAMPLES, 0.08)
    assert guard.snapshot()["stops"] == 0 and guard.allows_offload(step)
    guard = OffloadGuard(margin=0.05)
    step = offloaded(guard, 0, MIN_SAMPLES, 0.12)
    assert guard.snapshot()["stops"] == 1
