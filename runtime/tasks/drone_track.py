"""``drone-track``: a planar drone tracking a moving figure-8 in strong, gusty wind.

Built so that adaptation pays (issue #16, after Neural-Fly, O'Connell et al. 2022): the wind is
strong against the thrust limits, its force grows with the square of the airspeed, it changes
in time, and the thrust lags the command, so high-gain feedback alone cannot cancel it.
``drone-wind`` is left unchanged so its numbers stay reproducible.

Physics (vertical x-z plane, SI units, dt = 0.05 s, horizon 200 steps = 10 s):

- State: position p = (x, z) in m, velocity v in m/s, the thrust actually produced f in N and
  the command issued last step (N, still in flight).
- Action: commanded thrust u = (u_x, u_z) in N, u_x in [-10, 10], u_z in [0, 25] (the rotors
  cannot pull down). Hover at nominal mass needs u_z = 9.81 N.
- Actuator: one control period (0.05 s) of transport delay, then a first-order lag with time
  constant 0.2 s, exact over one step: f' = f + (1 - exp(-dt / 0.2)) (u_prev - f), i.e. 22 %
  of a command step arrives in each period after the delay.
- Wind (air velocity, m/s): w(t) = (wind_x + gust_amp * sin(gust_freq * t), wind_z), t the
  time since the episode started (s); e.g. Neural-Fly's 8.5 + 2.4 sin(t) is wind_x = 8.5,
  gust_amp = 2.4, gust_freq = 1.
- Drag, quadratic in the air-relative velocity r = w - v: F = 0.03 N s^2/m^2 * |r| * r
  (0.53 N at 4.2 m/s, 2.2 N at 8.5 m/s, 4.4 N at 12.1 m/s, 7.7 N at 16 m/s against a lateral
  thrust limit of 10 N).
- Motion: m = 1 kg * mass_scale; a = (f' + F) / m - (0, 9.81); v' = clip(v + dt a, +-20 m/s);
  p' = p + dt v' (semi-implicit Euler).
- Reference: a figure-8 p_ref(t) = (A_x sin(phi), A_z sin(2 phi)), phi = 2 pi t / T + phi_0,
  with A_x in [1, 2] m, A_z in [0.4, 1] m, period T in [5, 8] s and phase phi_0 in [0, 2 pi)
  drawn at every reset (``reference="random"``, the default), or the fixed figure-8 A_x = 1.5 m,
  A_z = 0.6 m, T = 6 s, phi_0 = 0 (``reference="figure8"``, used by ``bench tracking``).
  Its vertical part (up to 6.3 m/s^2) makes the thrust vary, which is what separates mass from
  vertical wind (in hover both only shift the hover thrust).
- Start: at the reference's position plus a uniform offset in [-0.1, 0.1] m per axis, at the
  reference's velocity, thrust and command (0, 9.81) N.
- Tether: the drone stays within 4 m of the reference per axis (position clipped, and that
  velocity component set to the reference's).
- Observation (12 numbers, float32, what a flight controller sees; the wind is not in it):
  position error p - p_ref (m), velocity error v - v_ref (m/s), reference velocity (m/s),
  reference acceleration (m/s^2), produced thrust f (N, a rotor-speed measurement), the command
  in flight (N). Sensor noise N(0, s^2) with s = 0.5 cm, 5 cm/s and 0.1 N on the errors and the
  thrust (a private stream seeded from the reset rng); the reference terms are exact.
- Reward per step: -|p' - p_ref'| (m) - 0.01 |u_n|^2 with u_n the command normalized to
  [-1, 1] per axis. Never terminates early.

``drone-track-residual`` (:class:`DroneTrackResidual`) is the same plant, tasks, splits,
observation and reward with another action: a force correction c in [-8, 8] N per axis added to
an onboard PD controller that runs on the observation the agent sees, u = PD(obs) with desired
= m0 (a_ref - 25 e_p - 7 e_v + g z) + c and half the thrust lag inverted (the DOB's feedback
gains, nominal mass m0 = 1 kg), clipped to the thrust limits. This is Neural-Fly's structure (a
nominal controller plus a learned, adapted force term): the agent learns the wind's and the
mass's force instead of the feedback loop. With c = 0 the drone flies the bare PD (nothing
adapts); with c = (m - m0) a_cmd - drag(true wind - v) (:func:`expert_force`) it flies the
privileged controller.

Task vector (5 numbers): wind_x, wind_z (m/s), mass_scale, gust_amp (m/s), gust_freq (rad/s).

Splits:

- train / test: (wind_x, wind_z, mass_scale) in [-12.5, 12.5] x [-2, 2] x [0.7, 1.3] is cut
  into 5 x 5 x 5 cells, 25 held out for test (seeded), the other 100 are train; gust_amp
  uniform in [0, 3] m/s, gust_freq in [0.5, 2] rad/s.
- ood ("storm"): |wind_x| in [13, 16] m/s (either sign), wind_z in [-3, 3] m/s, mass_scale in
  [0.7, 1.3], gust_amp in [2, 4] m/s, gust_freq in [0.5, 2] rad/s. Disjoint by |wind_x| > 12.5.

``set_tasks`` mid-episode models a wind change: the next step uses the new wind and mass; the
gust keeps the episode's clock.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import numpy as np

from runtime.tasks.base import FamilySpec, Split, TaskFamily, as_split
from runtime.tasks.splits import HeldOutCells, sample_box_signed_first, split_labels, within

DT = 0.05  # s
HORIZON = 200
MASS_NOMINAL = 1.0  # kg
GRAVITY = 9.81  # m/s^2
DRAG_COEF = 0.03  # N s^2 / m^2, F = DRAG_COEF * |r| * r
LAG_TAU = 0.2  # s, first-order thrust lag (after one control period of transport delay)
LAG_ALPHA = 1.0 - np.exp(-DT / LAG_TAU)  # fraction of a command step arriving per step
THRUST_LOW = np.array([-10.0, 0.0])  # N
THRUST_HIGH = np.array([10.0, 25.0])  # N
HOVER_THRUST = np.array([0.0, GRAVITY * MASS_NOMINAL])  # N
SPEED_MAX = 20.0  # m/s per axis
TETHER = 4.0  # m per axis around the reference
START = 0.1  # m, start offset range per axis
CONTROL_COST = 0.01
#: Sensor noise std: position (m), velocity (m/s), produced thrust (N).
NOISE_POS, NOISE_VEL, NOISE_THRUST = 0.005, 0.05, 0.1

#: Random figure-8 ranges: (low, high) of A_x (m), A_z (m), period (s).
REF_RANGES = ((1.0, 2.0), (0.4, 1.0), (5.0, 8.0))
#: The fixed figure-8 of ``reference="figure8"``: A_x (m), A_z (m), period (s), phase (rad).
FIGURE8 = (1.5, 0.6, 6.0, 0.0)
_REF_LOW = np.array([lo for lo, _ in REF_RANGES] + [0.0])
_REF_HIGH = np.array([hi for _, hi in REF_RANGES] + [2.0 * np.pi])

_IN_LOW = np.array([-12.5, -2.0, 0.7])
_IN_HIGH = np.array([12.5, 2.0, 1.3])
_GUST_LOW = np.array([0.0, 0.5])
_GUST_HIGH = np.array([3.0, 2.0])
_OOD_WIND_X = (13.0, 16.0)
_OOD_WIND_Z = (-3.0, 3.0)
_OOD_GUST_AMP = (2.0, 4.0)
_CELLS = HeldOutCells(_IN_LOW, _IN_HIGH, cells=5, test_fraction=0.2, seed=2025)

_OBS_HIGH = np.array([TETHER, TETHER, 25.0, 25.0, 3.0, 3.0, 8.0, 8.0])
_OBS_LOW = np.concatenate([-_OBS_HIGH, THRUST_LOW, THRUST_LOW])
_OBS_HIGH = np.concatenate([_OBS_HIGH, THRUST_HIGH, THRUST_HIGH])
_NOISE = np.array([NOISE_POS] * 2 + [NOISE_VEL] * 2 + [0.0] * 4 + [NOISE_THRUST] * 2 + [0.0] * 2)
_THRUST_MID = (THRUST_LOW + THRUST_HIGH) / 2.0
_THRUST_HALF = (THRUST_HIGH - THRUST_LOW) / 2.0

Reference = Literal["random", "figure8"]

SPEC = FamilySpec(
    name="drone-track",
    obs_dim=12,
    act_dim=2,
    task_dim=5,
    horizon=HORIZON,
    obs_low=_OBS_LOW,
    obs_high=_OBS_HIGH,
    act_low=THRUST_LOW,
    act_high=THRUST_HIGH,
    task_low=np.concatenate([_IN_LOW, _GUST_LOW]),
    task_high=np.concatenate([_IN_HIGH, _GUST_HIGH]),
    task_names=("wind_x", "wind_z", "mass_scale", "gust_amp", "gust_freq"),
    dt=DT,
    description=(
        "planar drone tracking a figure-8 in strong gusty wind (m/s): quadratic drag, "
        "thrust delay 0.05 s + lag 0.2 s, sensor noise, unknown mass"
    ),
    splits={
        "train": "wind_x [-12.5,12.5], wind_z [-2,2] m/s, mass x[0.7,1.3]: 100 of 125 cells; "
        "gusts 0-3 m/s at 0.5-2 rad/s",
        "test": "the 25 held-out cells of the same box (seeded), same gusts",
        "ood": "storm |wind_x| [13,16], wind_z [-3,3] m/s, gusts 2-4 m/s",
    },
)

#: ``drone-track-residual``: the onboard PD's gains (kp 1/s^2, kd 1/s, lag lead): the DOB's and
#: the privileged controller's feedback (drone_track_control.DOB_GAINS), and the bound on the
#: agent's force correction (N per axis).
PD_GAINS = (25.0, 7.0, 0.5)
RESIDUAL_MAX = np.array([8.0, 8.0])

RESIDUAL_SPEC = replace(
    SPEC,
    name="drone-track-residual",
    act_low=-RESIDUAL_MAX,
    act_high=RESIDUAL_MAX,
    description=(
        "drone-track with the action a force correction (N) added to an onboard PD with "
        "nominal-mass feedforward (Neural-Fly's structure: nominal controller + learned residual)"
    ),
)


class DroneTrack(TaskFamily):
    """Vectorized planar drone tracking a figure-8; see the module docstring."""

    spec = SPEC

    def __init__(self, num_envs: int = 1, reference: Reference = "random") -> None:
        if reference not in ("random", "figure8"):
            raise ValueError(f"reference must be 'random' or 'figure8', got {reference!r}")
        super().__init__(num_envs)
        self.reference = reference

    def sample_tasks(self, split: Split | str, n: int, rng: np.random.Generator) -> np.ndarray:
        split = as_split(split)
        if split is Split.OOD:
            return _sample_ood(n, rng)
        gust = rng.uniform(_GUST_LOW, _GUST_HIGH, size=(n, 2))
        return np.concatenate([_CELLS.sample(split, n, rng), gust], axis=1)

    def split_of(self, tasks: np.ndarray) -> np.ndarray:
        """The split each task vector belongs to: 'train', 'test', 'ood' or 'none'."""
        return split_of(tasks)

    def wind(self) -> np.ndarray:
        """The air velocity (m/s) acting during the next step, ``(N, 2)``."""
        t = self.t * DT
        gust = self.tasks[:, 3] * np.sin(self.tasks[:, 4] * t)
        return np.stack([self.tasks[:, 0] + gust, self.tasks[:, 1]], axis=1)

    def reference_at(self, step: np.ndarray | int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Reference position (m), velocity (m/s), acceleration (m/s^2) at ``step``, each
        ``(N, 2)``."""
        return figure8(self._ref, np.asarray(step) * DT)

    def _reset(self, rng: np.random.Generator) -> np.ndarray:
        n = self.num_envs
        if self.reference == "figure8":
            self._ref = np.tile(np.array(FIGURE8), (n, 1))
        else:
            self._ref = rng.uniform(_REF_LOW, _REF_HIGH, size=(n, 4))
        p_ref, v_ref, _ = self.reference_at(0)
        self.pos = p_ref + rng.uniform(-START, START, size=(n, 2))
        self.vel = v_ref.copy()
        self.thrust = np.tile(HOVER_THRUST, (n, 1))
        self.command = self.thrust.copy()  # issued last step, applied this step
        # A private stream for sensor noise, seeded from the caller's rng (deterministic).
        self._noise_rng = np.random.default_rng(rng.integers(0, 2**63))
        return self._observe(self.t)

    def _step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        action = self._command(action)
        mass = MASS_NOMINAL * self.tasks[:, 2:3]
        self.thrust = self.thrust + LAG_ALPHA * (self.command - self.thrust)
        self.command = action.copy()
        acc = (self.thrust + drag_force(self.wind() - self.vel)) / mass
        acc[:, 1] -= GRAVITY
        vel = np.clip(self.vel + DT * acc, -SPEED_MAX, SPEED_MAX)
        pos = self.pos + DT * vel
        p_ref, v_ref, _ = self.reference_at(self.t + 1)
        err = pos - p_ref
        tethered = np.abs(err) > TETHER
        self.pos = p_ref + np.clip(err, -TETHER, TETHER)
        self.vel = np.where(tethered, v_ref, vel)
        diff = self.pos - p_ref
        a_n = (action - _THRUST_MID) / _THRUST_HALF
        reward = -np.sqrt(np.einsum("ij,ij->i", diff, diff))
        reward -= CONTROL_COST * np.einsum("ij,ij->i", a_n, a_n)
        return self._observe(self.t + 1), reward, np.zeros(self.num_envs, dtype=bool)

    def _command(self, action: np.ndarray) -> np.ndarray:
        """The thrust command (N) the plant receives for the agent's ``action``."""
        return action

    def _observe(self, step: np.ndarray) -> np.ndarray:
        p_ref, v_ref, a_ref = self.reference_at(step)
        obs = np.concatenate(
            [self.pos - p_ref, self.vel - v_ref, v_ref, a_ref, self.thrust, self.command], axis=1
        )
        obs = obs + _NOISE * self._noise_rng.standard_normal(obs.shape)
        self._last_obs = np.clip(obs, _OBS_LOW, _OBS_HIGH)
        return self._last_obs

    def tracking_error(self) -> np.ndarray:
        """True (noise-free) distance to the reference (m), ``(N,)``."""
        p_ref, _, _ = self.reference_at(self.t)
        return np.hypot(*(self.pos - p_ref).T)


class DroneTrackResidual(DroneTrack):
    """``drone-track-residual``: the same plant, tasks, splits, observation and reward; the
    action is a force correction (N) added to an onboard PD controller (see the module
    docstring)."""

    spec = RESIDUAL_SPEC

    def _command(self, action: np.ndarray) -> np.ndarray:
        # The flight controller's PD acts on the observation the agent saw, like the agent.
        return pd_thrust(self._last_obs, PD_GAINS, force=action)


def pd_thrust(
    obs: np.ndarray,
    gains: tuple[float, float, float] = PD_GAINS,
    force: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Thrust command (N) of a PD (``gains`` = kp 1/s^2, kd 1/s, lag lead in [0, 1]) on the
    tracking error in ``obs`` ``(N, 12)``, around feedforward of the reference acceleration and
    gravity for the nominal mass m0 plus an extra ``force`` (N): desired = m0 (a_ref - kp e_p -
    kd e_v + g z) + force; ``lead`` partially inverts the thrust lag using the produced thrust."""
    lead = gains[2]
    desired = MASS_NOMINAL * commanded_acceleration(obs, gains) + force
    thrust = desired + lead * (1.0 / LAG_ALPHA - 1.0) * (desired - obs[:, 8:10])
    return np.clip(thrust, THRUST_LOW, THRUST_HIGH)


def commanded_acceleration(obs: np.ndarray, gains: tuple[float, float, float]) -> np.ndarray:
    """The PD's specific force (m/s^2): a_ref - kp e_p - kd e_v + g z, ``(N, 2)``."""
    kp, kd = gains[0], gains[1]
    acc = obs[:, 6:8] - kp * obs[:, 0:2] - kd * obs[:, 2:4]
    acc[:, 1] += GRAVITY
    return acc


def drag_force(air_velocity: np.ndarray) -> np.ndarray:
    """Quadratic drag (N) for the air-relative velocity r = wind - v ``(N, 2)`` in m/s."""
    speed = np.sqrt(np.einsum("ij,ij->i", air_velocity, air_velocity))[:, None]
    return DRAG_COEF * speed * air_velocity


def figure8(ref: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Position (m), velocity (m/s), acceleration (m/s^2) ``(N, 2)`` of the figure-8s ``ref``
    ``(N, 4)`` = (A_x, A_z, period, phase) at times ``t`` (s, scalar or ``(N,)``)."""
    amp_x, amp_z, period, phase = ref.T
    w = 2.0 * np.pi / period
    phi = w * t + phase
    pos = np.stack([amp_x * np.sin(phi), amp_z * np.sin(2.0 * phi)], axis=1)
    vel = np.stack([amp_x * w * np.cos(phi), 2.0 * amp_z * w * np.cos(2.0 * phi)], axis=1)
    acc = np.stack([-amp_x * w**2 * np.sin(phi), -4.0 * amp_z * w**2 * np.sin(2.0 * phi)], axis=1)
    return pos, vel, acc


def expert_action(
    obs: np.ndarray,
    tasks: np.ndarray,
    step: int | np.ndarray = 0,
    gains: tuple[float, float, float] = PD_GAINS,
) -> np.ndarray:
    """Privileged controller (reads wind and mass; ``step`` places the gust), thrust in N.

    PD on the tracking error (``gains`` = kp 1/s^2, kd 1/s, lag lead) around exact feedforward
    of the reference acceleration, gravity and the drag of the current wind for the true mass;
    ``lead`` in [0, 1] partially inverts the thrust lag using the produced thrust in ``obs``.
    """
    return pd_thrust(obs, gains, force=expert_force(obs, tasks, step, gains))


def expert_force(
    obs: np.ndarray,
    tasks: np.ndarray,
    step: int | np.ndarray = 0,
    gains: tuple[float, float, float] = PD_GAINS,
) -> np.ndarray:
    """The force correction (N) that makes the nominal-mass PD of :func:`pd_thrust` exact (the
    privileged action of ``drone-track-residual``): (m - m0) a_cmd minus the drag of the true
    wind, a_cmd = a_ref - kp e_p - kd e_v + g z."""
    acc = commanded_acceleration(obs, gains)
    e_v, v_ref = obs[:, 2:4], obs[:, 4:6]
    t = np.asarray(step) * DT
    wind = np.stack([tasks[:, 0] + tasks[:, 3] * np.sin(tasks[:, 4] * t), tasks[:, 1]], axis=1)
    mass = MASS_NOMINAL * tasks[:, 2:3]
    return (mass - MASS_NOMINAL) * acc - drag_force(wind - (e_v + v_ref))


def nominal_task(n: int) -> np.ndarray:
    """No wind, nominal mass, no gust: what a non-adaptive guess knows."""
    return np.tile(np.array([0.0, 0.0, 1.0, 0.0, 1.0]), (n, 1))


def split_of(tasks: np.ndarray) -> np.ndarray:
    """Membership of each task vector ``(n, 5)``: 'train', 'test', 'ood' or 'none'."""
    tasks = np.atleast_2d(np.asarray(tasks, dtype=np.float64))
    gust_in = within(tasks[:, 3:], _GUST_LOW, _GUST_HIGH)
    in_range = _CELLS.in_box(tasks[:, :3]) & gust_in
    ood = within(  # |wind_x|, wind_z, mass, gust amplitude, gust frequency
        np.column_stack([np.abs(tasks[:, 0]), tasks[:, 1:]]),
        [_OOD_WIND_X[0], _OOD_WIND_Z[0], _IN_LOW[2], _OOD_GUST_AMP[0], _GUST_LOW[1]],
        [_OOD_WIND_X[1], _OOD_WIND_Z[1], _IN_HIGH[2], _OOD_GUST_AMP[1], _GUST_HIGH[1]],
    )
    return split_labels(in_range, _CELLS.is_test(tasks[in_range, :3]), ood)


def _sample_ood(n: int, rng: np.random.Generator) -> np.ndarray:
    return sample_box_signed_first(
        n,
        rng,
        [_OOD_WIND_X[0], _OOD_WIND_Z[0], _IN_LOW[2], _OOD_GUST_AMP[0], _GUST_LOW[1]],
        [_OOD_WIND_X[1], _OOD_WIND_Z[1], _IN_HIGH[2], _OOD_GUST_AMP[1], _GUST_HIGH[1]],
    )
