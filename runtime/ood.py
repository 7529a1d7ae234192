"""Out-of-distribution monitoring and the runtime's events.

The step graph emits, per agent and per absorbed transition, a *surprise* score: the mean over
latent dimensions of ``(mu_i - m)^2 / (v + var_i)``, the squared distance between the new
evidence's factor mean ``mu_i`` and the current belief mean ``m`` in units of their combined
variance (belief variance ``v``, factor variance ``var_i``). Thresholds ``warn`` and ``alarm``
are quantiles of the score on in-distribution (train-split) rollouts, calibrated at export.

Events are raised when the score *crosses* a threshold upward (not on every step above it), and
"ood_clear" when it falls back below ``warn``. When the score stays above ``alarm`` for
``patience`` consecutive steps, the monitor flags a change point; the agent can then reset that
agent's belief to the prior (non-stationary tasks: the wind changed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Literal

import numpy as np

EventKind = Literal[
    "nonfinite_input",  # NaN/inf in obs, action or reward: transition skipped
    "nonfinite_belief",  # the update would have produced NaN/inf: transition skipped
    "out_of_bounds_input",  # an observation beyond the manifest's bounds + margin: skipped
    "outlier_rejected",  # surprise far beyond the calibrated alarm: transition not absorbed
    "fallback_action",  # the safe fallback action was returned
    "ood_warn",
    "ood_alarm",
    "ood_clear",
    "changepoint_reset",  # adaptation state reset to its initial value after a sustained alarm
    "adapted",  # an episodic adaptation (MAML's inner step) updated the state; detail: its stats
    "adapt_rejected",  # an episodic adaptation was not finite: the old state is kept
]


@dataclass(frozen=True)
class Event:
    """Something the operator should know about, for one agent of the batch."""

    kind: EventKind
    agent: int
    step: int
    value: float = float("nan")
    detail: str = ""


class Level(IntEnum):
    """Where a score sits relative to the thresholds."""

    OK = 0
    WARN = 1
    ALARM = 2


# Plain ints for the per-step arithmetic (IntEnum attribute access is slow in a hot loop).
OK, WARN, ALARM = int(Level.OK), int(Level.WARN), int(Level.ALARM)


def _frozen(flag: bool) -> np.ndarray:
    out = np.array([flag])
    out.flags.writeable = False
    return out


# A single agent's change-point mask, returned without allocating (read-only, shared).
_FIRED_1 = {False: _frozen(False), True: _frozen(True)}


@dataclass
class OODMonitor:
    """Per-agent threshold-crossing state for a batch of ``batch`` agents."""

    warn: float
    alarm: float
    batch: int = 1
    patience: int = 3
    level: np.ndarray = field(init=False)
    streak: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self, rows: np.ndarray | None = None) -> None:
        """Back to OK (all agents, or the boolean/int index ``rows``)."""
        if rows is None:
            self.level = np.zeros(self.batch, dtype=np.int8)
            self.streak = np.zeros(self.batch, dtype=np.int64)
        else:
            self.level[rows] = OK
            self.streak[rows] = 0

    def update(
        self, score_B: np.ndarray, updated_B: np.ndarray, step: int
    ) -> tuple[list[Event], np.ndarray]:
        """Events for this step and the boolean mask of agents whose change point fired.

        Agents whose transition was not absorbed (``updated_B`` False) keep their state.
        """
        if self.batch == 1:
            return self._update_one(float(score_B[0]), bool(updated_B[0]), step)
        above_warn = (score_B > self.warn).view(np.int8)
        new = np.where(updated_B, above_warn + (score_B > self.alarm).view(np.int8), self.level)
        events = self._crossings(new, score_B, step) if (new != self.level).any() else []
        self.level = new.astype(np.int8)
        self.streak = np.where(new == ALARM, self.streak + updated_B, 0)
        return events, self.streak >= self.patience

    def _update_one(self, score: float, updated: bool, step: int) -> tuple[list[Event], np.ndarray]:
        """The same for a single agent with Python scalars (the per-step path on a device)."""
        streak = int(self.streak[0])
        if not updated:
            return [], _FIRED_1[streak >= self.patience]
        new = ALARM if score > self.alarm else WARN if score > self.warn else OK
        events = []
        if new != self.level[0]:
            events = self._crossings(np.array([new], dtype=np.int8), np.array([score]), step)
            self.level[0] = new
        streak = streak + 1 if new == ALARM else 0
        self.streak[0] = streak
        return events, _FIRED_1[streak >= self.patience]

    def raised(self) -> bool:
        """Whether any agent is above ``warn`` (a scalar test for a single agent: ~0.1 µs
        instead of ~0.8 µs for ``level.any()``)."""
        return bool(self.level[0]) if self.batch == 1 else bool(self.level.any())

    def _crossings(self, new: np.ndarray, score_B: np.ndarray, step: int) -> list[Event]:
        events = []
        for i in np.flatnonzero(new != self.level):
            value = float(score_B[i])
            if new[i] > self.level[i]:
                kind: EventKind = "ood_alarm" if new[i] == ALARM else "ood_warn"
                limit = self.alarm if new[i] == ALARM else self.warn
                events.append(
                    Event(kind, int(i), step, value, f"surprise {value:.3g} > {limit:.3g}")
                )
            elif new[i] == OK:
                events.append(Event("ood_clear", int(i), step, value, "surprise back below warn"))
        return events


def calibrate_thresholds(
    scores: np.ndarray, warn_quantile: float = 0.99, alarm_quantile: float = 0.999
) -> dict[str, float]:
    """Warn/alarm thresholds as quantiles of in-distribution surprise scores (kept > 0)."""
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if scores.size == 0:
        raise ValueError("no finite surprise scores to calibrate on")
    floor = 1e-6
    warn = max(float(np.quantile(scores, warn_quantile)), floor)
    alarm = max(float(np.quantile(scores, alarm_quantile)), warn * (1 + 1e-6))
    return {"warn": warn, "alarm": alarm}
