"""The profiled costs, with the CPU attention and the pipeline's hand-offs corrected by what the
engine measures now.

The profile times the CPU program once, when the host is profiled, with every layer's inputs in
place. The CPU it runs on is shared (the engine thread, other processes, a VM's neighbours,
frequency scaling): on the GPU hosts the same kernel point measured minutes apart differs by up to
1.7x, and a profile taken at a slow or a fast moment makes the scheduler keep too few or too many
decodes on the CPU for as long as it is used. And in the engine each layer's CPU work waits for
its inputs from the GPU, which the profile's back-to-back layers never do: a lone decode's few
microseconds per layer measured up to 2x their profile while full CPU batches in the same hour
measured 0.8-1.1x. The engine measures the CPU program of every offloaded iteration anyway; this
model fits what it measures per run (one CPU sub-batch through one layer) as a scale of the
profiled time plus a fixed cost, over a window of recent iterations, so that the split follows
the CPU as it is at every batch size.

The pipelined period is a bound: each sub-batch's round trip between the devices, its projections
and its CPU attention, perfectly overlapped with the other's. What the hand-offs cost beyond the
copies and flag polls the profile times alone (on a slow-CPU H100 host, pipelined iterations ran
0.25-0.5 ms per layer over the bound while sequential ones stayed within 7-19% of their
prediction), the profile times once, as a whole pipelined iteration, at start: the hand-off, a
latency per layer of each sub-batch with CPU work, on its round trip and in the GPU's own stream
(neod.sched.cost). This model moves it with what pipelined iterations measure over their
prediction, and lets it return to the profile's value while none run, so that pipelining is
tried again once the host may have recovered. Every other cost is the profile's.

All corrections are kept in a file next to the profile they correct, so that a restarted engine
starts from what the last one measured rather than from the profile's moment; a profile measured
again starts over.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from neod.sched.cost import CostModel
from neod.sched.profile import Profile, read_json, write_json_atomic

logger = logging.getLogger(__name__)

SCALE_BOUNDS = (0.5, 2.0)  # how far measurements may move the profile: beyond, re-profile
WEIGHT = 0.1  # weight of the newest iteration in the hand-off's running average
CPU_FIT_DECAY = 0.95  # per iteration, of the CPU fit's older samples: a window of ~20
CPU_FIXED_MAX_S = 5e-4  # per run: beyond, the pool is broken rather than slow
# The runs' profiled times must vary by this much (coefficient of variation) over the window
# before the fixed cost is fitted apart from the scale; else only the scale moves.
CPU_FIT_SPREAD = 0.25
CPU_SAMPLE_CLAMP = 2.0  # a sample counts at most this far off its prediction (one hiccup)
HANDOFF_MAX_S = 1e-3  # per layer: beyond, pipelining is a loss on any model, and the guard's call
HANDOFF_FADE = 5e-4  # share of the learned hand-off forgotten per iteration that does not pipeline
# One iteration's excess counts at most as this much per layer, or as the hand-off itself where
# that is larger: a lone stall (an allocation, a page fault storm, a neighbour) moves it by a
# tenth at most, while a lasting excess still grows it by a tenth per iteration.
HANDOFF_STEP_FLOOR_S = 20e-6
# A pipelined iteration whose CPU pool was busy this share of its wall time or more was paced by
# the CPU's own work: its excess over the prediction is the CPU's (record_cpu), not the hand-off's.
CPU_BOUND_SHARE = 0.9
CORRECTIONS_FORMAT = 1


class _CpuFit:
    """Exponentially weighted sums of the (profiled, measured) seconds of CPU runs, for a least
    squares fit of measured = scale x profiled + fixed."""

    def __init__(self) -> None:
        self.w = self.p = self.y = self.pp = self.py = 0.0

    def add(self, profiled: float, measured: float, weight: float = 1.0) -> None:
        self.w += weight
        self.p += weight * profiled
        self.y += weight * measured
        self.pp += weight * profiled * profiled
        self.py += weight * profiled * measured

    def decay(self) -> None:
        for name in ("w", "p", "y", "pp", "py"):
            setattr(self, name, CPU_FIT_DECAY * getattr(self, name))

    def solve(self, fixed: float) -> tuple[float, float]:
        """(scale, fixed): both fitted where the window's profiled times vary enough to tell
        them apart, else the scale alone with `fixed` kept."""
        mean_p, mean_y = self.p / self.w, self.y / self.w
        var_p = self.pp / self.w - mean_p * mean_p
        low, high = SCALE_BOUNDS
        if var_p >= (CPU_FIT_SPREAD * mean_p) ** 2:
            scale = min(high, max(low, (self.py / self.w - mean_p * mean_y) / var_p))
            fixed = min(CPU_FIXED_MAX_S, max(0.0, mean_y - scale * mean_p))
        scale = min(high, max(low, (self.py - fixed * self.p) / self.pp))
        return scale, fixed


def fit_cpu_runs(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(scale, fixed) of measured = scale x profiled + fixed over (profiled, measured) seconds of
    CPU runs, within the corrections' bounds: the fixed cost only where the profiled times vary
    enough to tell it from the scale, else 0."""
    fit = _CpuFit()
    for profiled, measured in points:
        fit.add(profiled, measured)
    if fit.w == 0.0 or fit.pp <= 0.0:
        return 1.0, 0.0
    return fit.solve(0.0)


class CalibratedCostModel:
    def __init__(
        self,
        base: CostModel,
        cpu_scale: float = 1.0,
        handoff_s: float | None = None,
        cpu_fixed_s: float = 0.0,
    ) -> None:
        self.base = base
        # A CPU run (one sub-batch through one layer) as measured: scale x profiled + fixed.
        self.cpu_scale = cpu_scale
        self.cpu_fixed_s = cpu_fixed_s
        self.cpu_samples = 0
        self._cpu_fit = _CpuFit()
        # A pipelined sub-batch's hand-off per layer beyond its copies (neod.sched.cost): the
        # profile's, then a running average.
        self.profiled_handoff_s = base.pipeline_handoff_s()
        self.handoff_s = self.profiled_handoff_s if handoff_s is None else handoff_s
        self.handoff_samples = 0

    def linear_s(self, num_tokens: int) -> float:
        return self.base.linear_s(num_tokens)

    def prefill_attn_s(self, prompt_lens: Sequence[int]) -> float:
        return self.base.prefill_attn_s(prompt_lens)

    def gpu_decode_attn_s(self, num_seqs: int, num_ctx_tokens: int) -> float:
        return self.base.gpu_decode_attn_s(num_seqs, num_ctx_tokens)

    def cpu_decode_attn_s(self, num_seqs: int, num_ctx_tokens: int) -> float:
        if num_seqs <= 0:
            return 0.0
        profiled = self.base.cpu_decode_attn_s(num_seqs, num_ctx_tokens)
        return self.cpu_scale * profiled + self.cpu_fixed_s

    def transfer_s(self, num_cpu_seqs: int) -> float:
        return self.base.transfer_s(num_cpu_seqs)

    def swap_s(self, num_blocks: int) -> float:
        return self.base.swap_s(num_blocks)

    def iteration_overhead_s(self, num_seqs: int) -> float:
        return self.base.iteration_overhead_s(num_seqs)

    def pipeline_handoff_s(self) -> float:
        return self.handoff_s

    def record_cpu(
        self, measured_s: float, batches: Sequence[tuple[int, int]], num_layers: int
    ) -> None:
        """One iteration's CPU program: its busy time, and the CPU sub-batches it ran (decodes,
        context tokens), each through `num_layers` layers.

        The window starts from the current corrections as if they had been measured over a full
        window, so one iteration moves them by a few percent; a sample further than
        CPU_SAMPLE_CLAMP from its prediction counts as that far.
        """
        runs = num_layers * len(batches)
        if measured_s <= 0.0 or runs <= 0:
            return
        profiled = sum(self.base.cpu_decode_attn_s(n, ctx) for n, ctx in batches) / len(batches)
        if profiled <= 0.0:
            return
        predicted = self.cpu_scale * profiled + self.cpu_fixed_s
        measured = min(CPU_SAMPLE_CLAMP * predicted,
                       max(predicted / CPU_SAMPLE_CLAMP, measured_s / runs))
        fit = self._cpu_fit
        if fit.w == 0.0:
            fit.add(profiled, predicted, 1.0 / (1.0 - CPU_FIT_DECAY))
        fit.decay()
        fit.add(profiled, measured)
        self.cpu_scale, self.cpu_fixed_s = fit.solve(self.cpu_fixed_s)
        self.cpu_samples += 1

    def record_iteration(
        self,
        pipelined: bool,
        measured_s: float,
        predicted_s: float,
        num_layers: int,
        cpu_busy_s: float = 0.0,
    ) -> None:
        """One pure decode iteration (prefills and swaps have costs of their own): its wall time
        against the plan's prediction, which already carries the current hand-off, and how long
        the CPU pool was busy in it. An iteration that did not pipeline only lets the hand-off
        return toward the profile's; one the CPU's own work paced teaches it nothing (else a CPU
        misprediction, which the CPU's correction takes up, would also swell the hand-off). An
        excess beyond the hand-off itself counts as the hand-off (HANDOFF_STEP_FLOOR_S)."""
        if not pipelined:
            self.handoff_s += HANDOFF_FADE * (self.profiled_handoff_s - self.handoff_s)
            return
        if measured_s <= 0.0 or predicted_s <= 0.0 or num_layers <= 0:
            return
        if cpu_busy_s >= CPU_BOUND_SHARE * measured_s:
            return
        bound = max(self.handoff_s, self.profiled_handoff_s, HANDOFF_STEP_FLOOR_S)
        excess = min(bound, (measured_s - predicted_s) / num_layers)
        self.handoff_s = min(HANDOFF_MAX_S, max(0.0, self.handoff_s + WEIGHT * excess))
        self.handoff_samples += 1

    def state(self) -> dict[str, float | int]:
        return {
            "cpu_scale": self.cpu_scale,
            "cpu_fixed_s": self.cpu_fixed_s,
            "cpu_samples": self.cpu_samples,
            "handoff_s": self.handoff_s,
            "handoff_samples": self.handoff_samples,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take over stored corrections, within this model's bounds (a file from before the
        fixed CPU cost has none)."""
        scale, handoff = float(state["cpu_scale"]), float(state["handoff_s"])
        fixed = float(state.get("cpu_fixed_s", 0.0))
        samples = (max(0, int(state["cpu_samples"])), max(0, int(state["handoff_samples"])))
        if not all(map(math.isfinite, (scale, handoff, fixed))):
            raise ValueError("corrections must be finite numbers")
        low, high = SCALE_BOUNDS
        self.cpu_scale = min(high, max(low, scale))
        self.cpu_fixed_s = min(CPU_FIXED_MAX_S, max(0.0, fixed))
        self._cpu_fit = _CpuFit()  # the window starts over from the restored corrections
        self.handoff_s = min(HANDOFF_MAX_S, max(0.0, handoff))
        self.cpu_samples, self.handoff_samples = samples


def corrections_path(profile_file: str | os.PathLike[str]) -> Path:
    """Beside the profile file (profile-<id>.json): profile-<id>.corrections.json."""
    profile_file = Path(profile_file)
    return profile_file.with_name(f"{profile_file.stem}.corrections.json")


def _profile_stamp(profile: Profile) -> dict[str, Any]:
    """Which measurement of the setup the corrections apply to: a profile measured again, even
    for the same setup, or its hand-off timed again, starts over."""
    return {
        "fingerprint": profile.key.fingerprint(),
        "measured_at": profile.meta.get("measured_at"),
        "cpu_measured_at": profile.meta.get("cpu_measured_at"),
        "handoff_measured_at": profile.meta.get("handoff_measured_at"),
    }


def save_corrections(
    model: CalibratedCostModel, profile: Profile, path: str | os.PathLike[str]
) -> None:
    write_json_atomic(
        {
            "format": CORRECTIONS_FORMAT,
            "profile": _profile_stamp(profile),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **model.state(),
        },
        path,
    )


def load_corrections(
    model: CalibratedCostModel, profile: Profile, path: str | os.PathLike[str]
) -> bool:
    """Restore the corrections stored for exactly this profile into `model`; False (and `model`
    unchanged) if there are none, they are for another profile, or the file is unreadable."""
    data = read_json(path, "cost corrections", "starting from the profile")
    if data is None:
        return False
    if (
        not isinstance(data, dict)
        or data.get("format") != CORRECTIONS_FORMAT
        or data.get("profile") != _profile_stamp(profile)
    ):
        logger.info("cost corrections %s are for another profile; starting from it", path)
        return False
    try:
        model.restore(data)
    except (KeyError, TypeError, ValueError) as exc:
        logger.warning("cost corrections %s malformed (%s); starting from the profile", path, exc)
        return False
    return True
