"""N copies of one MuJoCo model stepped together (the ``bench`` extra: imports ``mujoco``).

Two ways to advance the batch by one control period (``frame_skip`` physics steps):

- ``"rollout"``: one call to :func:`mujoco.rollout.rollout` for the whole batch. The simulation
  state lives in one numpy array ``(N, nstate)`` (MuJoCo's ``mjSTATE_FULLPHYSICS``); no Python
  code runs per environment. ``threads > 1`` spreads the batch over MuJoCo's own thread pool.
  The solver warm start is not carried between calls, so trajectories match a persistent
  ``MjData`` to float32 precision for tens of steps, then contacts amplify the solver-tolerance
  differences (deterministic given a seed, statistically the same env, not bit for bit).
- ``"loop"``: a list of ``MjData`` and one Python loop calling ``mujoco.mj_step`` on the raw
  model, exactly what gymnasium's ``MujocoEnv.do_simulation`` does, without gymnasium's
  wrappers. Needed when a family reads quantities that only ``MjData`` holds (contact forces
  ``cfrc_ext`` after ``mj_rnePostConstraint``); bit-identical to gymnasium.

``edgeadapt bench envs`` reports the env-steps/s of both beside a plain gymnasium loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import mujoco
import numpy as np
from mujoco import rollout as mj_rollout

Mode = Literal["rollout", "loop"]

_FULL = mujoco.mjtState.mjSTATE_FULLPHYSICS


def gymnasium_asset(name: str) -> Path:
    """Path of a model file shipped with gymnasium's MuJoCo envs (``half_cheetah.xml``, ...)."""
    import gymnasium.envs.mujoco as gym_mujoco

    return Path(gym_mujoco.__file__).parent / "assets" / name


class MjBatch:
    """``num_envs`` simulations of one model; ``qpos`` ``(N, nq)`` and ``qvel`` ``(N, nv)``."""

    def __init__(
        self,
        xml_path: Path,
        num_envs: int,
        frame_skip: int,
        mode: Mode = "rollout",
        threads: int = 1,
        contact_forces: bool = False,
    ) -> None:
        if mode == "rollout" and contact_forces:
            raise ValueError("contact forces need mode='loop' (rollout keeps no MjData per env)")
        self.model = mujoco.MjModel.from_xml_path(str(xml_path))
        self.num_envs, self.frame_skip, self.mode = num_envs, frame_skip, mode
        self.contact_forces = contact_forces
        self.init_qpos = self.model.qpos0.copy()
        self.init_qvel = np.zeros(self.model.nv)
        nq, nv = self.model.nq, self.model.nv
        self._q = slice(1, 1 + nq)  # FULLPHYSICS layout: time, qpos, qvel, act, ...
        self._v = slice(1 + nq, 1 + nq + nv)
        self._nstate = mujoco.mj_stateSize(self.model, _FULL)
        self.state = np.zeros((num_envs, self._nstate))
        if mode == "rollout":
            n_data = max(1, min(threads, num_envs))
            self._datas = [mujoco.MjData(self.model) for _ in range(n_data)]
            self._models = [self.model] * num_envs
            self._out = np.zeros((num_envs, frame_skip, self._nstate))
        else:
            self._datas = [mujoco.MjData(self.model) for _ in range(num_envs)]
        self.cfrc_ext = np.zeros((num_envs, self.model.nbody, 6))

    @property
    def qpos(self) -> np.ndarray:
        """Generalized positions ``(N, nq)`` (a view; do not modify)."""
        return self.state[:, self._q]

    @property
    def qvel(self) -> np.ndarray:
        """Generalized velocities ``(N, nv)`` (a view; do not modify)."""
        return self.state[:, self._v]

    def set_state(self, qpos: np.ndarray, qvel: np.ndarray) -> None:
        """Reset every simulation to ``qpos``/``qvel`` (time 0, no contact forces yet)."""
        self.state[:] = 0.0
        self.state[:, self._q], self.state[:, self._v] = qpos, qvel
        self.cfrc_ext[:] = 0.0
        if self.mode == "loop":
            for i, data in enumerate(self._datas):
                mujoco.mj_resetData(self.model, data)
                data.qpos[:], data.qvel[:] = qpos[i], qvel[i]
                mujoco.mj_forward(self.model, data)

    def step(self, ctrl: np.ndarray, active: np.ndarray | None = None) -> None:
        """Hold ``ctrl`` ``(N, nu)`` for ``frame_skip`` physics steps in every simulation (with
        mode='loop', only where ``active``: terminated episodes cost nothing)."""
        if self.mode == "rollout":
            control = np.repeat(ctrl[:, None, :], self.frame_skip, axis=1)
            mj_rollout.rollout(
                self._models,
                self._datas,
                self.state,
                control,
                nstep=self.frame_skip,
                state=self._out,
                skip_checks=True,
            )
            self.state[:] = self._out[:, -1]
            return
        indices = range(self.num_envs) if active is None else np.flatnonzero(active)
        for i in indices:
            data = self._datas[i]
            data.ctrl[:] = ctrl[i]
            mujoco.mj_step(self.model, data, nstep=self.frame_skip)
            if self.contact_forces:
                mujoco.mj_rnePostConstraint(self.model, data)
                self.cfrc_ext[i] = data.cfrc_ext
            mujoco.mj_getState(self.model, data, self.state[i], _FULL)

    def body_xpos(self, body: int) -> np.ndarray:
        """World position ``(N, 3)`` of ``body`` (m); mode='loop' only (MjData holds it)."""
        if self.mode != "loop":
            raise ValueError("body positions need mode='loop'")
        return np.stack([data.xpos[body] for data in self._datas])
