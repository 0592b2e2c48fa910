"""The scheduler's cost corrections (neod.sched.calibration) kept across restarts, in a file beside
the profile they correct: a restarted engine schedules from what the last one measured while
serving, not from the profile's moment, until its own iterations take over."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from neod.sched import CalibratedCostModel, corrections_path, load_corrections, save_corrections

if TYPE_CHECKING:
    from neod.engine.runtime import EngineRuntime

logger = logging.getLogger(__name__)

SAVE_EVERY_S = 60.0  # while the corrections change; and at close


class CorrectionsKeeper:
    def __init__(self, runtime: EngineRuntime) -> None:
        self.rt = runtime
        self.restored = False
        self._saved_state: dict[str, float | int] | None = None
        self._saved_at = time.monotonic()

    def _target(self) -> tuple[CalibratedCostModel, Path] | None:
        """The cost model to correct and its file; None where this engine keeps no profile (a
        tensor-parallel follower) or the scheduler has no calibrated costs."""
        from neod.config import profile_dir
        from neod.sched import profile_path

        profile = self.rt.profile
        cost = getattr(self.rt.scheduler, "cost", None)
        if profile is None or not isinstance(cost, CalibratedCostModel):
            return None
        return cost, corrections_path(profile_path(profile_dir(self.rt.cfg), profile.key))

    def restore(self) -> None:
        """At start, and whenever the cost model is rebuilt (a resized CPU pool)."""
        target = self._target()
        self.restored = False
        if target is None:
            return
        cost, path = target
        self.restored = load_corrections(cost, self.rt.profile, path)
        self._saved_state = cost.state()
        if self.restored:
            logger.info(
                "cost corrections restored from %s: CPU attention x%.3f + %.0f us per "
                "sub-batch layer (%d iterations), pipeline hand-offs +%.0f us "
                "(%d iterations)",
                path, cost.cpu_scale, cost.cpu_fixed_s * 1e6, cost.cpu_samples,
                cost.handoff_s * 1e6, cost.handoff_samples,
            )  # fmt: skip

    def tick(self) -> None:
        """After each step: save once SAVE_EVERY_S have passed since the last save, if the
        corrections moved."""
        if time.monotonic() - self._saved_at >= SAVE_EVERY_S:
            self.save()

    def save(self) -> None:
        target = self._target()
        self._saved_at = time.monotonic()
        if target is None:
            return
        cost, path = target
        state = cost.state()
        if state == self._saved_state:
            return
        try:
            save_corrections(cost, self.rt.profile, path)
        except OSError as exc:  # the profile directory went read-only or full: serve on
            logger.warning("cost corrections not saved to %s: %s", path, exc)
            return
        self._saved_state = state
