"""Classical controllers for ``drone-track`` (numpy only): the baselines of ``bench tracking``.

Every controller implements the :class:`runtime.evaluation.AdaptivePolicy` protocol (batched,
normalized actions in [-1, 1]), so the benchmark flies them exactly like a learned bundle. They
read only the observation (tracking error, velocity error, reference feedforward, produced
thrust) and know the nominal mass (1 kg), gravity and the control period, never the wind.

- :class:`PIDController`: a_cmd = a_ref - kp e_p - kd e_v - ki integral(e_p dt);
  thrust = m0 (a_cmd + g z). The integral (anti-windup clamp ``i_max``) carries over the episodes
  of a task, like an adaptation state.
- :class:`DOBController`: the same PID plus a disturbance observer. From every transition it
  measures the force the model does not explain, d = m0 ((v' - v) / dt + g z) - f' (f' the
  produced thrust of the next observation, v from velocity error + reference velocity), low-pass
  filters it with bandwidth ``bandwidth`` (rad/s, L1-adaptive-control style) and subtracts the
  estimate from the command; ``lead`` in [0, 1] partially inverts the known thrust lag.
- :class:`PrivilegedController`: the DOB's feedback around exact feedforward of the true wind,
  gust and mass (it reads the task): the privileged oracle row.

Gains: :func:`tune` is a grid search on *train* tasks with random figure-8s (seed 0, 64 tasks,
one 10 s episode, error measured from t = 2 s); :data:`PID_GAINS` and :data:`DOB_GAINS` are its
results (``edgeadapt bench tracking --tune --json`` reruns the search).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, replace

import numpy as np

from runtime.tasks import drone_track as track
from runtime.tasks.base import Split

_G = np.array([0.0, track.GRAVITY])
_HALF = (track.THRUST_HIGH - track.THRUST_LOW) / 2.0


@dataclass(frozen=True)
class Gains:
    """Feedback gains: ``kp`` (1/s^2), ``kd`` (1/s), ``ki`` (1/s^3), integral clamp ``i_max``
    (m s); disturbance-observer bandwidth (rad/s, 0 = none) and lag ``lead`` in [0, 1]."""

    kp: float
    kd: float
    ki: float = 0.0
    i_max: float = 2.0
    bandwidth: float = 0.0
    lead: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


#: Results of :func:`tune` (see the module docstring); the search's table is in docs/tasks.md.
PID_GAINS = Gains(kp=16.0, kd=8.0, ki=12.8, i_max=1.0)
DOB_GAINS = Gains(kp=25.0, kd=7.0, ki=0.0, i_max=1.0, bandwidth=5.0, lead=0.5)


class PIDController:
    """PID with reference-acceleration and gravity feedforward (see the module docstring)."""

    def __init__(self, gains: Gains = PID_GAINS, mass: float = track.MASS_NOMINAL) -> None:
        self.gains = gains
        self.mass = mass
        self.begin_task(np.zeros((1, track.SPEC.task_dim)))

    def begin_task(self, tasks_BK: np.ndarray) -> None:
        n = len(tasks_BK)
        self.integral = np.zeros((n, 2))
        self.disturbance = np.zeros((n, 2))

    def begin_episode(self) -> None:
        return None

    def act(self, obs_BO: np.ndarray) -> np.ndarray:
        return _normalize(self.thrust(np.asarray(obs_BO, dtype=np.float64)))

    def thrust(self, obs: np.ndarray) -> np.ndarray:
        """Commanded thrust (N) for observations ``(B, 10)``."""
        g = self.gains
        e_p, e_v, a_ref, f = obs[:, 0:2], obs[:, 2:4], obs[:, 6:8], obs[:, 8:10]
        acc = a_ref - g.kp * e_p - g.kd * e_v - g.ki * self.integral
        desired = self.mass * (acc + _G) - self.disturbance
        # Partial inversion of the first-order lag: ask for more than wanted while f lags.
        lead = g.lead * (1.0 / track.LAG_ALPHA - 1.0)
        return np.clip(desired + lead * (desired - f), track.THRUST_LOW, track.THRUST_HIGH)

    def observe(self, obs_BO, action_BA, reward_B, next_obs_BO, done_B=False) -> None:
        nxt = np.asarray(next_obs_BO, dtype=np.float64)
        g = self.gains
        self.integral = np.clip(self.integral + track.DT * nxt[:, 0:2], -g.i_max, g.i_max)
        if g.bandwidth > 0.0:
            self._observe_disturbance(np.asarray(obs_BO, dtype=np.float64), nxt)

    def _observe_disturbance(self, obs: np.ndarray, nxt: np.ndarray) -> None:
        vel = obs[:, 2:4] + obs[:, 4:6]
        vel_next = nxt[:, 2:4] + nxt[:, 4:6]
        measured = self.mass * ((vel_next - vel) / track.DT + _G) - nxt[:, 8:10]
        gain = 1.0 - np.exp(-self.gains.bandwidth * track.DT)
        self.disturbance = self.disturbance + gain * (measured - self.disturbance)


class DOBController(PIDController):
    """PID + low-pass disturbance observer (see the module docstring)."""

    def __init__(self, gains: Gains = DOB_GAINS, mass: float = track.MASS_NOMINAL) -> None:
        if gains.bandwidth <= 0.0:
            raise ValueError(f"a disturbance observer needs bandwidth > 0, got {gains.bandwidth}")
        super().__init__(gains, mass)


class PrivilegedController:
    """The oracle row: told the true wind, gust and mass. The DOB's feedback (``gains``: kp,
    kd, lag lead) around exact feedforward of gravity, drag and the reference acceleration."""

    def __init__(self, gains: Gains = DOB_GAINS) -> None:
        self.gains = gains
        self.begin_task(np.zeros((1, track.SPEC.task_dim)))

    def begin_task(self, tasks_BK: np.ndarray) -> None:
        self.tasks = np.asarray(tasks_BK, dtype=np.float64)
        self.step = 0

    def set_tasks(self, tasks_BK: np.ndarray) -> None:
        """The wind changed mid-flight (the oracle is told)."""
        self.tasks = np.asarray(tasks_BK, dtype=np.float64)

    def begin_episode(self) -> None:
        self.step = 0

    def act(self, obs_BO: np.ndarray) -> np.ndarray:
        g = self.gains
        obs = np.asarray(obs_BO, dtype=np.float64)
        return _normalize(track.expert_action(obs, self.tasks, self.step, (g.kp, g.kd, g.lead)))

    def observe(self, obs_BO, action_BA, reward_B, next_obs_BO, done_B=False) -> None:
        self.step += 1


@dataclass(frozen=True)
class TuneRow:
    """One grid point of :func:`tune`: gains and the mean / p95 tracking error (cm)."""

    gains: Gains
    mean_cm: float
    p95_cm: float


def tune(
    kind: str, tasks: int = 64, seed: int = 0, skip_s: float = 2.0
) -> tuple[Gains, list[TuneRow]]:
    """Grid search of ``kind`` ("pid" or "dob") gains on *train* tasks with random figure-8s;
    returns the gains with the lowest mean error and every row (sorted, best first)."""
    env = track.DroneTrack(tasks)
    task_set = env.sample_tasks(Split.TRAIN, tasks, np.random.default_rng(seed))
    rows = []
    for gains in _grid(kind):
        ctrl = DOBController(gains) if kind == "dob" else PIDController(gains)
        err = fly_errors_cm(ctrl, env, task_set, seed)[round(skip_s / track.DT) :]
        rows.append(TuneRow(gains, float(err.mean()), float(np.percentile(err, 95))))
    rows.sort(key=lambda r: r.mean_cm)
    return rows[0].gains, rows


def fly_errors_cm(policy, env: track.DroneTrack, tasks: np.ndarray, seed: int) -> np.ndarray:
    """Tracking error (cm) ``(T, N)`` of one episode of ``policy`` on ``tasks``."""
    policy.begin_task(tasks)
    policy.begin_episode()
    obs = env.reset(tasks, np.random.default_rng(seed))
    errors = []
    for t in range(env.spec.horizon):
        action = policy.act(obs)
        res = env.step(track.THRUST_LOW + _HALF * (action + 1.0))
        policy.observe(obs, action, res.reward, res.obs, t == env.spec.horizon - 1)
        obs = res.obs
        errors.append(100.0 * env.tracking_error())
    return np.asarray(errors)


def _grid(kind: str) -> list[Gains]:
    """The searched gains: natural frequency x damping x integral (PID) or observer bandwidth
    x lag lead (DOB, no integral)."""
    out = []
    for omega, zeta in itertools.product((3.0, 4.0, 5.0, 6.0, 7.0), (0.7, 0.85, 1.0)):
        base = Gains(kp=omega**2, kd=2.0 * zeta * omega, i_max=1.0)
        if kind == "pid":
            out += [replace(base, ki=k * omega**3 / 10.0) for k in (0.0, 1.0, 2.0, 4.0)]
        elif kind == "dob":
            out += [
                replace(base, bandwidth=b, lead=lead)
                for b, lead in itertools.product((5.0, 10.0, 20.0), (0.0, 0.5, 1.0))
            ]
        else:
            raise ValueError(f"kind must be 'pid' or 'dob', got {kind!r}")
    return out


def _normalize(thrust: np.ndarray) -> np.ndarray:
    """Physical thrust (N) -> normalized action in [-1, 1] (float32)."""
    norm = (thrust - track.THRUST_LOW) / _HALF - 1.0
    return np.clip(norm, -1.0, 1.0).astype(np.float32)
