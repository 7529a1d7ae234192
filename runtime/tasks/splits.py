"""Disjoint in-range train/test splits of a continuous task box by held-out grid cells.

The in-range box ``[low, high]`` is cut into a regular grid of ``cells`` per dimension. A fixed,
seeded fraction of the cells is held out for the **test** split; the **train** split is the
remaining cells. Cells are half-open (``[lo, hi)``, the last one closed at ``high``), so every
point of the box belongs to exactly one cell and therefore to exactly one split: disjointness holds
by construction and :meth:`HeldOutCells.split_of` checks it for any task vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from runtime.tasks.base import Split


def within(points: np.ndarray, low: Sequence[float], high: Sequence[float]) -> np.ndarray:
    """Whether each row of ``points`` ``(n, K)`` lies in the closed box [low, high]."""
    points = np.asarray(points)
    return np.all((points >= np.asarray(low)) & (points <= np.asarray(high)), axis=1)


def split_labels(in_range: np.ndarray, test: np.ndarray, ood: np.ndarray) -> np.ndarray:
    """Split names per task from masks: ``in_range`` and ``ood`` ``(n,)``, ``test`` for the
    in-range rows only ``(n_in,)``; 'ood' wins, rows in neither are 'none'."""
    out = np.full(len(in_range), "none", dtype=object)
    out[in_range] = np.where(test, "test", "train")
    out[ood] = "ood"
    return out


def sample_box_signed_first(
    n: int, rng: np.random.Generator, low: Sequence[float], high: Sequence[float]
) -> np.ndarray:
    """``n`` points uniform in the box ``[low, high]``, the first coordinate's sign random
    (a wind from either side): the signs are drawn first, then each column in turn."""
    sign = rng.choice(np.array([-1.0, 1.0]), size=n)
    cols = np.stack([rng.uniform(lo, hi, size=n) for lo, hi in zip(low, high, strict=True)], 1)
    cols[:, 0] *= sign
    return cols


@dataclass(frozen=True)
class HeldOutCells:
    """A grid over an in-range task box with a seeded set of held-out (test) cells."""

    low: np.ndarray
    high: np.ndarray
    cells: int
    test_fraction: float
    seed: int
    _test: np.ndarray = field(init=False, repr=False)
    _train: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        low = np.asarray(self.low, dtype=np.float64)
        high = np.asarray(self.high, dtype=np.float64)
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)
        total = self.cells ** len(low)
        n_test = max(1, round(self.test_fraction * total))
        order = np.random.default_rng(self.seed).permutation(total)
        object.__setattr__(self, "_test", np.sort(order[:n_test]))
        object.__setattr__(self, "_train", np.sort(order[n_test:]))

    @property
    def dim(self) -> int:
        return len(self.low)

    def cell_ids(self, split: Split) -> np.ndarray:
        """Flat indices of the cells of ``split`` (TRAIN or TEST)."""
        return self._test if split is Split.TEST else self._train

    def sample(self, split: Split, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` points ``(n, dim)``: a uniform cell of ``split``, then uniform inside it."""
        ids = self.cell_ids(split)
        flat = ids[rng.integers(0, len(ids), size=n)]
        coords = np.stack(np.unravel_index(flat, (self.cells,) * self.dim), axis=1)
        width = (self.high - self.low) / self.cells
        return self.low + (coords + rng.uniform(0.0, 1.0, size=(n, self.dim))) * width

    def flat_cell(self, points: np.ndarray) -> np.ndarray:
        """Flat cell index of each in-box point ``(n, dim)`` -> ``(n,)``."""
        width = (self.high - self.low) / self.cells
        coords = np.floor((np.asarray(points) - self.low) / width).astype(np.int64)
        coords = np.clip(coords, 0, self.cells - 1)
        return np.ravel_multi_index(tuple(coords.T), (self.cells,) * self.dim)

    def in_box(self, points: np.ndarray) -> np.ndarray:
        """Whether each point lies in the closed in-range box."""
        return within(points, self.low, self.high)

    def is_test(self, points: np.ndarray) -> np.ndarray:
        """Whether each (in-box) point falls in a held-out cell."""
        return np.isin(self.flat_cell(points), self._test)


@dataclass(frozen=True)
class BoxSplits:
    """Ready-made splits for a user family: held-out cells of an in-range box, plus an ood box.

    train / test = :class:`HeldOutCells` of ``[low, high]``; ood = uniform in
    ``[ood_low, ood_high]``, which must not overlap the in-range box in at least one dimension
    (checked here), so the three splits are disjoint.
    """

    low: np.ndarray
    high: np.ndarray
    ood_low: np.ndarray
    ood_high: np.ndarray
    cells: int = 4
    test_fraction: float = 0.25
    seed: int = 0
    _grid: HeldOutCells = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("low", "high", "ood_low", "ood_high"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        apart = (self.ood_low > self.high) | (self.ood_high < self.low)
        if not np.any(apart):
            raise ValueError("the ood box overlaps the in-range box in every dimension")
        grid = HeldOutCells(self.low, self.high, self.cells, self.test_fraction, self.seed)
        object.__setattr__(self, "_grid", grid)

    @property
    def task_low(self) -> np.ndarray:
        """Lower corner of the training range (used to normalize oracle inputs)."""
        return self.low

    @property
    def task_high(self) -> np.ndarray:
        return self.high

    @property
    def notes(self) -> dict[str, str]:
        """One line per split, for ``edgeadapt envs``."""
        n_test = len(self._grid.cell_ids(Split.TEST))
        n_all = self.cells ** len(self.low)
        box = f"box {self.low.tolist()}..{self.high.tolist()}"
        return {
            "train": f"{n_all - n_test} of {n_all} grid cells of the {box}",
            "test": f"the {n_test} held-out cells (seed {self.seed})",
            "ood": f"uniform in {self.ood_low.tolist()}..{self.ood_high.tolist()}",
        }

    def sample(self, split: Split, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` task vectors of ``split``."""
        if split is Split.OOD:
            return rng.uniform(self.ood_low, self.ood_high, size=(n, len(self.low)))
        return self._grid.sample(split, n, rng)

    def split_of(self, tasks: np.ndarray) -> np.ndarray:
        """Membership of each task vector: 'train', 'test', 'ood' or 'none'."""
        tasks = np.atleast_2d(np.asarray(tasks, dtype=np.float64))
        inside = self._grid.in_box(tasks)
        ood = within(tasks, self.ood_low, self.ood_high)
        return split_labels(inside, self._grid.is_test(tasks[inside]), ood)
