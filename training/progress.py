"""The training loops' progress bar (tqdm): one per run, the metrics that matter in its postfix."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Postfix label -> (metrics key, format) shown when the key is in the iteration's row.
Postfix = dict[str, tuple[str, str]]


class Progress:
    """A tqdm bar over training iterations (a no-op when disabled)."""

    def __init__(
        self,
        enabled: bool,
        total: int,
        initial: int,
        desc: str,
        postfix: Postfix,
        position: int = 0,
    ) -> None:
        self.postfix = postfix
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True,
                position=position,
            )  # fmt: skip

    def advance(self, row: dict[str, Any], budget_left_s: float | None = None) -> None:
        """One iteration done: show its metrics (and the wall-clock budget left, if any: under
        ``train.max_minutes`` the iteration total is rarely what ends the run)."""
        if self.bar is None:
            return
        shown = {label: fmt.format(row[key]) for label, (key, fmt) in self.postfix.items()
                 if key in row}  # fmt: skip
        if budget_left_s is not None:
            shown["budget left"] = f"{max(0.0, budget_left_s) / 60:.1f} min"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Deadline:
    """A training run's wall-clock budget (``train.max_minutes``; None = no budget).

    Counted from construction (a resumed run gets a fresh budget). Loops stop starting new
    iterations once :meth:`check` returns True, then checkpoint as after the last iteration.
    """

    def __init__(self, minutes: float | None) -> None:
        self.limit_s = None if minutes is None else 60.0 * minutes
        self.start = time.perf_counter()
        self.reached = False

    def left_s(self) -> float | None:
        """Seconds of the budget left (None without a budget)."""
        if self.limit_s is None:
            return None
        return self.limit_s - (time.perf_counter() - self.start)

    def check(self) -> bool:
        """True once the budget is spent (and from then on)."""
        limit = self.limit_s
        if not self.reached and limit is not None and time.perf_counter() - self.start >= limit:
            self.reached = True
            log.info("wall-clock budget of %.1f min reached", limit / 60.0)
        return self.reached


METRICS_FILE = "metrics.jsonl"


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    """One metrics row (JSON) appended to the run's ``metrics.jsonl``."""
    with (run_dir / METRICS_FILE).open("a") as f:
        f.write(json.dumps(row) + "\n")


def run_loop(
    state: Any,
    run_dir: Path,
    bar: Progress,
    iteration: Callable[[float, int], dict[str, Any]],
    quick_eval: Callable[[Any], dict[str, Any]],
    checkpoint: Callable[[Any, Path], None],
) -> None:
    """The meta-training loop every family shares, around its ``iteration``.

    ``iteration(start, steps_at_start)`` runs one iteration (advancing ``state.iteration`` and
    ``state.env_steps``) and returns its metrics row; ``start`` is the loop's
    ``time.perf_counter()`` origin. The loop stops at ``train.iterations`` or the wall-clock
    budget, adds the quick evaluation every ``train.eval_every`` iterations and after the last
    one, logs, keeps the history, checkpoints every ``train.checkpoint_every`` and at the end.
    """
    train = state.cfg.train
    start, steps_at_start = time.perf_counter(), state.env_steps
    deadline = Deadline(train.max_minutes)
    while state.iteration < train.iterations and not deadline.reached:
        row = iteration(start, steps_at_start)
        last = state.iteration == train.iterations or deadline.check()
        if state.iteration % train.eval_every == 0 or last:
            row.update(quick_eval(state))
        append_metrics(run_dir, row)
        state.history.append(row)
        if state.iteration % train.checkpoint_every == 0:
            checkpoint(state, run_dir)
        bar.advance(row, deadline.left_s())
    checkpoint(state, run_dir)
    bar.close()
