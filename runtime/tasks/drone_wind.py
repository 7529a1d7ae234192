"""``drone-wind``: a planar drone holding a waypoint under unknown wind and mass.

Physics (vertical x-z plane, SI units, semi-implicit Euler with dt = 0.05 s):

- State: position p = (x, z) in m, velocity v = (v_x, v_z) in m/s. The waypoint is the origin;
  every episode starts at rest at a uniform random offset in [-1.5, 1.5]^2 m (from the reset rng).
- Action: thrust force u = (u_x, u_z) in N, thrust-limited to u_x in [-6, 6], u_z in [0, 20]
  (the rotor cannot pull down). Hover without wind at nominal mass needs u_z = 9.81 N, about the
  middle of the range.
- Task vector (4 numbers): ``wind_x``, ``wind_z`` = wind (air) velocity in m/s; ``mass_scale``
  (mass = 1 kg * mass_scale); ``fog_std`` = std of the sensor noise in m and m/s (0 outside ood).
- Forces: linear air drag against the air-relative velocity, F = 0.5 N s/m * (wind - v), plus
  gravity 9.81 m/s^2 down:  a = (u + 0.5 * (wind - v)) / m - (0, 9.81).
  So the wind is a steady force of 0.5 N per m/s (up to 3 N at the edge of the training range,
  about half the lateral thrust) and the hover thrust m * g - 0.5 * wind_z depends on the mass:
  the best action needs the task (feedforward of wind and weight), and one transition
  (s, a, r, s') shows the acceleration that reveals them.
- Limits: speed clipped to +-10 m/s per axis (the autopilot's limiter); the drone is fenced to
  +-5 m per axis around the waypoint (at the fence the position is clipped and that velocity
  component zeroed).
- Observation (4 numbers, float32): position relative to the waypoint (m) and velocity (m/s), plus
  Gaussian sensor noise of std ``fog_std`` on every component ("fog"; noise-free when 0); clipped
  to the declared bounds [-6, 6] m and [-12, 12] m/s (only noise can reach the clip).
- Reward per step: -||p' - waypoint|| (m, true position, not the noisy one)
  - 0.05 * ||a_n||^2 with a_n the thrust normalized to [-1, 1] per axis. Horizon 100 steps (5 s).
  Never terminates early.

Splits (task box of wind_x in [-6, 6] m/s, wind_z in [-3, 3] m/s, mass_scale in [0.7, 1.3]):

- train / test: the box is cut into 5 x 5 x 5 cells; 25 cells (20 %, fixed seed) are held out for
  test, the other 100 are train (see :mod:`runtime.tasks.splits`). ``fog_std`` = 0.
- ood ("storm in fog"): |wind_x| in [7.5, 10] m/s (either sign), wind_z in [-4, 4] m/s,
  mass_scale in [0.7, 1.3], fog_std in [0.02, 0.1]. Disjoint from train/test by |wind_x| > 6.

``set_tasks`` mid-episode models a wind shift: the next step uses the new wind and mass.
"""

from __future__ import annotations

import numpy as np

from runtime.tasks.base import FamilySpec, Split, TaskFamily, as_split
from runtime.tasks.splits import HeldOutCells, sample_box_signed_first, split_labels, within

DT = 0.05  # s
HORIZON = 100
MASS_NOMINAL = 1.0  # kg
GRAVITY = 9.81  # m/s^2
DRAG = 0.5  # N s / m, linear drag against the air-relative velocity
THRUST_LOW = np.array([-6.0, 0.0])  # N
THRUST_HIGH = np.array([6.0, 20.0])  # N
SPEED_MAX = 10.0  # m/s per axis
FENCE = 5.0  # m per axis around the waypoint
START = 1.5  # m, start offset range per axis
CONTROL_COST = 0.05

_IN_LOW = np.array([-6.0, -3.0, 0.7])
_IN_HIGH = np.array([6.0, 3.0, 1.3])
_OOD_WIND_X = (7.5, 10.0)
_OOD_WIND_Z = (-4.0, 4.0)
_OOD_FOG = (0.02, 0.1)
_CELLS = HeldOutCells(_IN_LOW, _IN_HIGH, cells=5, test_fraction=0.2, seed=2024)

_OBS_HIGH = np.array([6.0, 6.0, 12.0, 12.0])
_THRUST_MID = (THRUST_LOW + THRUST_HIGH) / 2.0
_THRUST_HALF = (THRUST_HIGH - THRUST_LOW) / 2.0

SPEC = FamilySpec(
    name="drone-wind",
    obs_dim=4,
    act_dim=2,
    task_dim=4,
    horizon=HORIZON,
    obs_low=-_OBS_HIGH,
    obs_high=_OBS_HIGH,
    act_low=THRUST_LOW,
    act_high=THRUST_HIGH,
    task_low=np.append(_IN_LOW, 0.0),
    task_high=np.append(_IN_HIGH, 0.0),
    task_names=("wind_x", "wind_z", "mass_scale", "fog_std"),
    dt=DT,
    description="planar drone holding a waypoint under unknown wind (m/s) and mass",
    splits={
        "train": "wind_x [-6,6], wind_z [-3,3] m/s, mass x[0.7,1.3]: 100 of 125 grid cells",
        "test": "the 25 held-out cells of the same box (seeded)",
        "ood": "storm |wind_x| [7.5,10], wind_z [-4,4] m/s, in fog: sensor noise 0.02-0.1",
    },
)


class DroneWind(TaskFamily):
    """Vectorized planar drone; see the module docstring for physics, reward and splits."""

    spec = SPEC

    def sample_tasks(self, split: Split | str, n: int, rng: np.random.Generator) -> np.ndarray:
        split = as_split(split)
        if split is Split.OOD:
            return _sample_ood(n, rng)
        return np.concatenate([_CELLS.sample(split, n, rng), np.zeros((n, 1))], axis=1)

    def split_of(self, tasks: np.ndarray) -> np.ndarray:
        """The split each task vector belongs to: 'train', 'test', 'ood' or 'none'."""
        return split_of(tasks)

    def _reset(self, rng: np.random.Generator) -> np.ndarray:
        n = self.num_envs
        self.pos = rng.uniform(-START, START, size=(n, 2))
        self.vel = np.zeros((n, 2))
        # A private stream for sensor noise, seeded from the caller's rng (deterministic).
        self._noise_rng = np.random.default_rng(rng.integers(0, 2**63))
        return self._observe()

    def _step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        wind, mass = self.tasks[:, 0:2], MASS_NOMINAL * self.tasks[:, 2:3]
        acc = (action + DRAG * (wind - self.vel)) / mass
        acc[:, 1] -= GRAVITY
        vel = np.clip(self.vel + DT * acc, -SPEED_MAX, SPEED_MAX)
        pos = self.pos + DT * vel
        fenced = np.abs(pos) > FENCE
        self.pos = np.clip(pos, -FENCE, FENCE)
        self.vel = np.where(fenced, 0.0, vel)
        a_n = (action - _THRUST_MID) / _THRUST_HALF
        reward = -np.sqrt(np.einsum("ij,ij->i", self.pos, self.pos))
        reward -= CONTROL_COST * np.einsum("ij,ij->i", a_n, a_n)
        return self._observe(), reward, np.zeros(self.num_envs, dtype=bool)

    def _observe(self) -> np.ndarray:
        obs = np.concatenate([self.pos, self.vel], axis=1)
        fog = self.tasks[:, 3:4]
        if np.any(fog > 0.0):
            obs = obs + fog * self._noise_rng.standard_normal(obs.shape)
            obs = np.clip(obs, -_OBS_HIGH, _OBS_HIGH)
        return obs


def expert_action(obs: np.ndarray, tasks: np.ndarray) -> np.ndarray:
    """Hand-written task-aware controller (privileged: reads wind and mass), thrust in N.

    PD on the observed offset and velocity (natural frequency 3 rad/s, critically damped), plus
    feedforward that cancels gravity and the wind drag for the true mass.
    """
    pos, vel = obs[:, 0:2], obs[:, 2:4]
    wind, mass = tasks[:, 0:2], MASS_NOMINAL * tasks[:, 2:3]
    acc = -9.0 * pos - 6.0 * vel
    acc[:, 1] += GRAVITY
    thrust = mass * acc - DRAG * (wind - vel)
    return np.clip(thrust, THRUST_LOW, THRUST_HIGH)


def nominal_task(n: int) -> np.ndarray:
    """The centre of the training box (no wind, nominal mass): what a non-adaptive guess knows."""
    return np.tile(np.append((_IN_LOW + _IN_HIGH) / 2.0, 0.0), (n, 1))


def split_of(tasks: np.ndarray) -> np.ndarray:
    """Membership of each task vector ``(n, 4)``: 'train', 'test', 'ood' or 'none'."""
    tasks = np.atleast_2d(np.asarray(tasks, dtype=np.float64))
    in_range = _CELLS.in_box(tasks[:, :3]) & (tasks[:, 3] == 0.0)
    ood = within(  # |wind_x|, wind_z, mass, sensor fog
        np.column_stack([np.abs(tasks[:, 0]), tasks[:, 1:]]),
        [_OOD_WIND_X[0], _OOD_WIND_Z[0], _IN_LOW[2], _OOD_FOG[0]],
        [_OOD_WIND_X[1], _OOD_WIND_Z[1], _IN_HIGH[2], _OOD_FOG[1]],
    )
    return split_labels(in_range, _CELLS.is_test(tasks[in_range, :3]), ood)


def _sample_ood(n: int, rng: np.random.Generator) -> np.ndarray:
    return sample_box_signed_first(
        n,
        rng,
        [_OOD_WIND_X[0], _OOD_WIND_Z[0], _IN_LOW[2], _OOD_FOG[0]],
        [_OOD_WIND_X[1], _OOD_WIND_Z[1], _IN_HIGH[2], _OOD_FOG[1]],
    )
