"""The offload guard: auto stops offloading when iterations that use the CPU are measured slower."""

from neod.engine.guard import BACKOFF_STEPS, MIN_SAMPLES, OffloadGuard


def feed(guard: OffloadGuard, start: int, used_cpu: bool, tokens_per_s: float, n: int,
         predicted_s: float = 0.01) -> int:
    for step in range(start, start + n):
        guard.record(step, used_cpu, int(tokens_per_s / 100), 0.01, predicted_s)
    return start + n


def test_blocks_when_offloading_is_measured_slower_then_retries():
    guard = OffloadGuard(margin=0.05)
    step = feed(guard, 0, False, 1000.0, MIN_SAMPLES)
    step = feed(guard, step, True, 900.0, MIN_SAMPLES - 1)
    assert guard.allows_offload(step)  # not enough CPU samples yet
    step = feed(guard, step, True, 900.0, 1)
    assert not guard.allows_offload(step)
    assert guard.allows_offload(step + BACKOFF_STEPS)
    assert guard.snapshot()["offload_tokens_per_s"] is None  # measured afresh after the pause


def test_keeps_offloading_while_it_pays():
    guard = OffloadGuard(margin=0.05)
    step = feed(guard, 0, False, 1000.0, MIN_SAMPLES)
    step = feed(guard, step, True, 1400.0, 4 * MIN_SAMPLES)
    assert guard.allows_offload(step)
    step = feed(guard, step, True, 980.0, MIN_SAMPLES)  # within the margin: still allowed
    assert guard.allows_offload(step)


def test_blocks_when_offloaded_iterations_are_badly_underestimated():
    """With no GPU-only iteration to compare with, a predictor that is far off stops offloading."""
    guard = OffloadGuard()
    step = feed(guard, 0, True, 1000.0, MIN_SAMPLES, predicted_s=0.009)  # 11% over: trusted
    assert guard.allows_offload(step)
    step = feed(guard, step, True, 1000.0, MIN_SAMPLES, predicted_s=0.005)  # twice the prediction
    assert not guard.allows_offload(step)
