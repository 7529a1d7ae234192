"""A user task family that emits NaN after a few steps (for the CLI error test)."""

from __future__ import annotations

import numpy as np

from runtime.tasks import register_family
from runtime.tasks.point_nav import PointNav, _spec


class NaNPointNav(PointNav):
    spec = _spec("nan-point-nav", sparse=False)

    def _step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        obs, reward, term = super()._step(action)
        if self.t[0] >= 3:
            reward = reward * np.nan
        return obs, reward, term


register_family("nan-point-nav", NaNPointNav, overwrite=True)
