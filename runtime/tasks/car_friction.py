"""``car-friction``: lane keeping at a target speed on a winding road with unknown friction.

Physics (kinematic single-track car in road coordinates, SI units, semi-implicit Euler with
dt = 0.1 s, horizon 100 steps = 10 s):

- Road: a lane whose centre-line curvature is kappa(s) = 0.01 sin(2 pi s / 200 m + phi) in 1/m
  (tightest radius 100 m, one left-right wave per 200 m); the phase phi is uniform per episode
  (from the reset rng). s is the distance travelled along the road (m).
- State: lateral offset y from the lane centre (m, + left), heading error psi relative to the lane
  (rad, + left), speed v (m/s), road position s (m, not observed). Start: y ~ U[-0.5, 0.5] m,
  psi ~ U[-0.05, 0.05] rad, v ~ U[10, 20] m/s, s = 0.
- Action: road-wheel steering angle delta_cmd in [-0.1, 0.1] rad and longitudinal acceleration
  a_cmd in [-4, 2] m/s^2.
- Task vector (3 numbers): ``mu`` road friction coefficient (1 dry asphalt .. 0.4 wet; ice
  0.1-0.2 in ood), ``steer_bias`` (rad) added to every steering command (a misaligned rack),
  ``v_target`` (m/s) the speed the city wants.
- Tyres: the demanded accelerations are a_x = a_cmd and a_y = v^2 tan(delta_cmd + bias) / 2.7 m
  (wheelbase 2.7 m). If their norm exceeds the friction circle mu * 9.81 m/s^2 both are scaled down
  onto it (the car understeers and brakes/accelerates less). Then
  v' = clip(v + dt a_x, 0, 35); psi' = wrap(psi + dt (a_y / max(v, 1) - v kappa(s)));
  y' = y + dt v' sin psi'; s' = s + dt v' cos psi'. At |y| = 5 m the car meets the guard rail:
  y is clipped and psi set to 0.
- Observation (5 numbers, float32): y (m), psi (rad), v (m/s), 100 * kappa(s) and
  100 * kappa(s + 30 m) (road curvature now and 30 m ahead, in units of 1/(100 m), so in [-1, 1]).
  Every component is within its declared bounds by construction (no clipping needed).
- Reward per step: -|y'| (m) - |v' - v_target| / 5 (m/s) - 0.05 ||a_n||^2, with a_n the action
  normalized to [-1, 1] per axis. Never terminates early.

What adaptation buys: the steering bias must be cancelled (0.01 rad is 2.3 m/s^2 of lateral
acceleration at 25 m/s), the target speed is only visible through the reward, and on a wet road
the car must slow down for curves (v^2 kappa <= mu g: about 19.8 m/s at mu = 0.4 for the tightest
bend). Friction shows in transitions where the tyres saturate; bias and target speed in any.

Splits (task box mu in [0.4, 1.0], steer_bias in [-0.01, 0.01] rad, v_target in [10, 25] m/s):

- train / test: the box is cut into 5 x 5 x 5 cells; 25 cells (20 %, fixed seed) are held out for
  test, the other 100 are train (see :mod:`runtime.tasks.splits`).
- ood ("ice"): mu in [0.1, 0.2], steer_bias and v_target in range. Disjoint by mu < 0.4.

``set_tasks`` mid-episode models a change of road (rain starts, a bridge freezes).
"""

from __future__ import annotations

import numpy as np

from runtime.tasks.base import FamilySpec, Split, TaskFamily, as_split
from runtime.tasks.splits import HeldOutCells, split_labels

DT = 0.1  # s
HORIZON = 100
GRAVITY = 9.81  # m/s^2
WHEELBASE = 2.7  # m
STEER_MAX = 0.1  # rad
ACCEL_LOW, ACCEL_HIGH = -4.0, 2.0  # m/s^2
SPEED_MAX = 35.0  # m/s
RAIL = 5.0  # m, guard rail distance from the lane centre
CURVE_AMPLITUDE = 0.01  # 1/m
CURVE_WAVELENGTH = 200.0  # m
PREVIEW = 30.0  # m
SPEED_ERROR_SCALE = 5.0  # m/s per unit of reward
CONTROL_COST = 0.05

_IN_LOW = np.array([0.4, -0.01, 10.0])
_IN_HIGH = np.array([1.0, 0.01, 25.0])
_OOD_MU = (0.1, 0.2)
_CELLS = HeldOutCells(_IN_LOW, _IN_HIGH, cells=5, test_fraction=0.2, seed=4242)

_ACT_LOW = np.array([-STEER_MAX, ACCEL_LOW])
_ACT_HIGH = np.array([STEER_MAX, ACCEL_HIGH])
_ACT_MID = (_ACT_LOW + _ACT_HIGH) / 2.0
_ACT_HALF = (_ACT_HIGH - _ACT_LOW) / 2.0

SPEC = FamilySpec(
    name="car-friction",
    obs_dim=5,
    act_dim=2,
    task_dim=3,
    horizon=HORIZON,
    obs_low=np.array([-RAIL, -np.pi, 0.0, -1.0, -1.0]),
    obs_high=np.array([RAIL, np.pi, SPEED_MAX, 1.0, 1.0]),
    act_low=_ACT_LOW,
    act_high=_ACT_HIGH,
    task_low=_IN_LOW,
    task_high=_IN_HIGH,
    task_names=("mu", "steer_bias", "v_target"),
    dt=DT,
    description="lane keeping at an unknown target speed, friction (dry..wet) and steering bias",
    splits={
        "train": "mu [0.4,1], steer_bias [-0.01,0.01] rad, v_target [10,25] m/s: 100/125 cells",
        "test": "the 25 held-out cells of the same box (seeded)",
        "ood": "ice: mu [0.1,0.2], steer_bias and v_target in range",
    },
)


class CarFriction(TaskFamily):
    """Vectorized lane-keeping car; see the module docstring for physics, reward and splits."""

    spec = SPEC

    def sample_tasks(self, split: Split | str, n: int, rng: np.random.Generator) -> np.ndarray:
        split = as_split(split)
        if split is Split.OOD:
            tasks = _CELLS.sample(Split.TRAIN, n, rng)  # bias and speed anywhere in range
            tasks[:, 0] = rng.uniform(*_OOD_MU, size=n)
            return tasks
        return _CELLS.sample(split, n, rng)

    def split_of(self, tasks: np.ndarray) -> np.ndarray:
        """The split each task vector belongs to: 'train', 'test', 'ood' or 'none'."""
        return split_of(tasks)

    def _reset(self, rng: np.random.Generator) -> np.ndarray:
        n = self.num_envs
        self.y = rng.uniform(-0.5, 0.5, size=n)
        self.psi = rng.uniform(-0.05, 0.05, size=n)
        self.v = rng.uniform(10.0, 20.0, size=n)
        self.s = np.zeros(n)
        self.phase = rng.uniform(0.0, 2.0 * np.pi, size=n)
        return self._observe()

    def _step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mu, bias, v_target = self.tasks[:, 0], self.tasks[:, 1], self.tasks[:, 2]
        v = self.v
        a_x = action[:, 1]
        a_y = v * v * np.tan(action[:, 0] + bias) / WHEELBASE
        limit = mu * GRAVITY
        scale = np.minimum(1.0, limit / np.maximum(np.hypot(a_x, a_y), 1e-9))
        a_x, a_y = a_x * scale, a_y * scale
        kappa = road_curvature(self.s, self.phase)
        v_next = np.clip(v + DT * a_x, 0.0, SPEED_MAX)
        psi = self.psi + DT * (a_y / np.maximum(v, 1.0) - v * kappa)
        psi = (psi + np.pi) % (2.0 * np.pi) - np.pi
        y = self.y + DT * v_next * np.sin(psi)
        self.s = self.s + DT * v_next * np.cos(psi)
        railed = np.abs(y) >= RAIL
        self.y = np.clip(y, -RAIL, RAIL)
        self.psi = np.where(railed, 0.0, psi)
        self.v = v_next
        a_n = (action - _ACT_MID) / _ACT_HALF
        reward = -np.abs(self.y) - np.abs(v_next - v_target) / SPEED_ERROR_SCALE
        reward -= CONTROL_COST * np.einsum("ij,ij->i", a_n, a_n)
        return self._observe(), reward, np.zeros(self.num_envs, dtype=bool)

    def _observe(self) -> np.ndarray:
        now = road_curvature(self.s, self.phase) / CURVE_AMPLITUDE
        ahead = road_curvature(self.s + PREVIEW, self.phase) / CURVE_AMPLITUDE
        return np.stack([self.y, self.psi, self.v, now, ahead], axis=1)


def road_curvature(s: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Lane centre-line curvature (1/m) at road position ``s`` (m) for per-episode ``phase``."""
    return CURVE_AMPLITUDE * np.sin(2.0 * np.pi * s / CURVE_WAVELENGTH + phase)


def expert_action(obs: np.ndarray, tasks: np.ndarray) -> np.ndarray:
    """Hand-written task-aware controller (privileged: reads mu, bias, v_target).

    Speed: track min(v_target, the speed at which the sharper of the two visible curvatures uses
    80 % of the friction circle). Steering: follow the road curvature and pull y and psi back with
    a critically damped loop (1 rad/s), cancel the bias, and keep within the friction circle.
    """
    y, psi, v = obs[:, 0], obs[:, 1], np.maximum(obs[:, 2], 1.0)
    mu, bias, v_target = tasks[:, 0], tasks[:, 1], tasks[:, 2]
    kappa = np.maximum(np.abs(obs[:, 3]), np.abs(obs[:, 4])) * CURVE_AMPLITUDE
    v_safe = np.sqrt(0.8 * mu * GRAVITY / np.maximum(kappa, 1e-6))
    accel = np.clip(1.0 * (np.minimum(v_target, v_safe) - v), ACCEL_LOW, ACCEL_HIGH)
    yaw_rate = v * obs[:, 3] * CURVE_AMPLITUDE - 2.0 * psi - y / v
    steer = np.arctan(v * yaw_rate * WHEELBASE / (v * v)) - bias
    return np.stack([np.clip(steer, -STEER_MAX, STEER_MAX), accel], axis=1)


def nominal_task(n: int) -> np.ndarray:
    """The centre of the training box: what a non-adaptive guess knows."""
    return np.tile((_IN_LOW + _IN_HIGH) / 2.0, (n, 1))


def split_of(tasks: np.ndarray) -> np.ndarray:
    """Membership of each task vector ``(n, 3)``: 'train', 'test', 'ood' or 'none'."""
    tasks = np.atleast_2d(np.asarray(tasks, dtype=np.float64))
    in_range = _CELLS.in_box(tasks)
    rest_in_range = _CELLS.in_box(np.column_stack([np.full(len(tasks), _IN_LOW[0]), tasks[:, 1:]]))
    ood = (tasks[:, 0] >= _OOD_MU[0]) & (tasks[:, 0] <= _OOD_MU[1]) & rest_in_range
    return split_labels(in_range, _CELLS.is_test(tasks[in_range]), ood)
